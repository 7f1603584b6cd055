"""The model side of the app, free of Ray: turns calls naming adapters into engine
batches, keeps one call's bad adapter from failing the others in its batch, and
watches the registry for new versions (hot-swap)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from adapters.errors import AdapterConfigError, AdapterError
from adapters.registry import AdapterHub
from serving.config import EngineConfig
from serving.engine import Engine
from serving.metrics import EngineMetrics
from serving.rows import ClassifyRow, GenerateRow, Generation, Prediction

logger = logging.getLogger(__name__)

FULL_POLL_EVERY = 30  # watcher polls between full re-resolves of every adapter in use


class WrongTaskError(AdapterConfigError):
    """The adapter exists but serves another task than the route asked for."""


@dataclass(frozen=True)
class ClassifyCall:
    adapter: str
    inputs: tuple[tuple[str, str | None], ...]  # (text, text_pair)


@dataclass(frozen=True)
class ClassifyResult:
    adapter: str
    version: int
    task_type: str
    predictions: list[Prediction]


@dataclass(frozen=True)
class GenerateCall:
    adapter: str | None  # None: the bare backbone
    prompts: tuple[str, ...]
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerateResult:
    adapter: str | None
    version: int | None
    generations: list[Generation]


class ModelService:
    def __init__(self, config: EngineConfig, watch_interval_s: float = 0.0, hub: AdapterHub | None = None,
                 metrics: EngineMetrics | None = None):  # fmt: skip
        self.engine = Engine(config, hub=hub, metrics=metrics)
        self._stop = threading.Event()
        self._watcher = None
        if watch_interval_s > 0:
            self._watcher = threading.Thread(target=self._watch, args=(watch_interval_s,), daemon=True)
            self._watcher.start()

    # --- batches -------------------------------------------------------------------

    def classify_many(self, calls: list[ClassifyCall]) -> list[ClassifyResult | AdapterError]:
        """One forward pass for every input of every call that resolved."""
        return self._batched(
            calls, ("seq_cls", "regression"), self.engine.classify,
            lambda call, key: [ClassifyRow(key, text, pair) for text, pair in call.inputs],
            lambda call, version, task, out: ClassifyResult(call.adapter, version, task, out),
        )  # fmt: skip

    def generate_many(self, calls: list[GenerateCall]) -> list[GenerateResult | AdapterError]:
        """One batched decode for every prompt of every call that resolved."""
        return self._batched(
            calls, ("causal_lm",), self.engine.generate,
            lambda c, key: [
                GenerateRow(key, prompt, c.max_tokens, c.temperature, c.top_p, c.stop, c.seed) for prompt in c.prompts
            ],
            lambda call, version, task, out: GenerateResult(call.adapter, version, out),
        )  # fmt: skip

    def _batched(self, calls, expect, run, rows_of, result_of) -> list:
        """Resolve each call, run all good calls' rows as one batch, split the outputs back.

        A call naming a bad adapter gets its own error; the others still run.
        """
        resolved = self._resolve_all([c.adapter for c in calls], expect)
        rows = {i: rows_of(calls[i], r[0]) for i, r in enumerate(resolved) if not isinstance(r, AdapterError)}
        results: list = list(resolved)
        try:
            outputs = iter(run([row for call_rows in rows.values() for row in call_rows]) if rows else ())
        except AdapterError as err:
            return [err if i in rows else r for i, r in enumerate(resolved)]
        for i, call_rows in rows.items():
            _, version, task = resolved[i]
            results[i] = result_of(calls[i], version, task, [next(outputs) for _ in call_rows])
        return results

    def _resolve_all(self, refs: list[str | None], expect: tuple[str, ...]) -> list:
        """(key, version, task) per ref, or the AdapterError that ref raised."""
        out = []
        for ref in refs:
            if ref is None:
                out.append((None, None, "causal_lm"))
                continue
            try:
                key = self.engine.resolve(ref)
                task = self.engine.adapter_config(key).task_type
                if task not in expect:
                    raise WrongTaskError(f"adapter '{ref}' is a {task} adapter; this route serves {'/'.join(expect)}")
                out.append((key, self.engine.catalog.version_of(key).version, task))
            except AdapterError as err:
                out.append(err)
        return out

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.engine.chat_prompt(messages)

    # --- management ----------------------------------------------------------------

    def load(self, ref: str, pin: bool = False) -> dict:
        key = self.engine.load(ref, pin)
        version = self.engine.catalog.version_of(key)
        return {"adapter": version.name, "version": version.version, "digest": key, "pinned": pin}

    def unload(self, ref: str) -> dict:
        return {"adapter": ref, "unloaded": self.engine.unload(ref)}

    def reload(self, name: str | None = None) -> dict:
        return {"changed": self.engine.reload(name)}

    def status(self) -> dict:
        in_use = self.engine.catalog.in_use()
        return {
            "backbone": self.engine.backbone.name,
            "causal_lm": self.engine.is_causal,
            "device": str(self.engine.device),
            "resident": self.engine.bank.resident(),
            "adapters": {name: v.version for name, v in in_use.items()},
        }

    def metrics_text(self) -> bytes:
        return self.engine.metrics.exposition(self.engine.bank.resident())

    def close(self) -> None:
        self._stop.set()

    def poll_registry(self, last_token: str | None, full: bool = False) -> str | None:
        """One watcher step: re-resolve the adapters in use only when the hub's change
        token moved since `last_token` (or when `full`); returns the token seen."""
        token = self.engine.catalog.hub.change_token()
        if token != last_token or full:
            changed = self.engine.reload()
            if changed:
                logger.info("hot-swapped %s", changed)
        return token

    def _watch(self, interval: float) -> None:
        """Poll the registry; a failure (store unreachable) keeps serving resident adapters."""
        token, polls = None, 0
        while not self._stop.wait(interval):
            polls += 1
            try:
                # Now and then re-resolve everything anyway: a publisher that crashed
                # between its commit and its token update must not go unnoticed forever.
                token = self.poll_registry(token, full=polls % FULL_POLL_EVERY == 1)
            except Exception:  # noqa: BLE001 - the watcher must outlive a flaky store
                logger.warning("registry poll failed; serving resident adapters", exc_info=True)

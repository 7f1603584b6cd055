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
from serving.rows import ClassifyRow, GenerateRow, Generation, Prediction

logger = logging.getLogger(__name__)


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
    def __init__(self, config: EngineConfig, watch_interval_s: float = 0.0, hub: AdapterHub | None = None):
        self.engine = Engine(config, hub=hub)
        self._stop = threading.Event()
        self._watcher = None
        if watch_interval_s > 0:
            self._watcher = threading.Thread(target=self._watch, args=(watch_interval_s,), daemon=True)
            self._watcher.start()

    # --- batches -------------------------------------------------------------------

    def classify_many(self, calls: list[ClassifyCall]) -> list[ClassifyResult | AdapterError]:
        """One forward pass for every input of every call that resolved."""
        resolved = self._resolve_all([c.adapter for c in calls], expect=("seq_cls", "regression"))
        good = [i for i, r in enumerate(resolved) if not isinstance(r, AdapterError)]
        rows = [ClassifyRow(resolved[i][0], text, pair) for i in good for text, pair in calls[i].inputs]
        results: list = list(resolved)
        try:
            predictions = iter(self.engine.classify(rows)) if rows else iter(())
        except AdapterError as err:
            return [err if i in good else r for i, r in enumerate(results)]
        for i in good:
            key, version, task = resolved[i]
            preds = [next(predictions) for _ in calls[i].inputs]
            results[i] = ClassifyResult(calls[i].adapter, version, task, preds)
        return results

    def generate_many(self, calls: list[GenerateCall]) -> list[GenerateResult | AdapterError]:
        resolved = self._resolve_all([c.adapter for c in calls], expect=("causal_lm",))
        good = [i for i, r in enumerate(resolved) if not isinstance(r, AdapterError)]
        rows = [
            GenerateRow(resolved[i][0], prompt, c.max_tokens, c.temperature, c.top_p, c.stop, c.seed)
            for i in good
            for c in [calls[i]]
            for prompt in c.prompts
        ]
        results: list = list(resolved)
        try:
            generations = iter(self.engine.generate(rows)) if rows else iter(())
        except AdapterError as err:
            return [err if i in good else r for i, r in enumerate(results)]
        for i in good:
            _, version, _ = resolved[i]
            results[i] = GenerateResult(calls[i].adapter, version, [next(generations) for _ in calls[i].prompts])
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

    def _watch(self, interval: float) -> None:
        """Poll the registry; a failure (store unreachable) keeps serving resident adapters."""
        while not self._stop.wait(interval):
            try:
                changed = self.engine.reload()
                if changed:
                    logger.info("hot-swapped %s", changed)
            except Exception:  # noqa: BLE001 - the watcher must outlive a flaky store
                logger.warning("registry poll failed; serving resident adapters", exc_info=True)

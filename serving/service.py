"""The model side of the app, free of Ray: turns calls naming adapters into engine
batches, keeps one call's bad adapter from failing the others in its batch, and
watches the registry for new versions (hot-swap)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

from adapters.errors import AdapterError
from adapters.store.desired_state import DesiredState
from adapters.store.hub import AdapterHub
from adapters.store.names import AdapterRef, as_ref
from serving.calls import (
    ClassifyCall,
    ClassifyResult,
    DecodeEvent,
    GenerateCall,
    GenerateResult,
    raise_if_error,
)
from serving.completions import Completions, ContinuousCompletions, StaticCompletions
from serving.config import EngineConfig
from serving.engine import Engine
from serving.errors import BatchFailedError, WrongTaskError
from serving.metrics import EngineMetrics
from serving.rows import ClassifyRow, GenerateRow

logger = logging.getLogger(__name__)

FULL_POLL_EVERY = 30  # watcher polls between full re-resolves of every adapter in use
CLASSIFY_TASKS = ("seq_cls", "regression")


@dataclass
class _Prepared:
    """A call ready to join a batch: its adapter resolved and its inputs tokenised."""

    call: ClassifyCall | GenerateCall
    version: int | None
    task: str
    rows: list


class ModelService:
    def __init__(self, config: EngineConfig, watch_interval_s: float = 0.0, hub: AdapterHub | None = None,
                 metrics: EngineMetrics | None = None, replica_id: str = "local",
                 batch_generate: Callable[[GenerateCall], Awaitable[GenerateResult | AdapterError]] | None = None):
        """`batch_generate`: where static batching sends a completion (a Serve replica's batcher);
        without one, each runs alone in a thread."""
        self.engine = Engine(config, hub=hub, metrics=metrics)
        self.completions = self._completions(batch_generate)
        self.replica_id = replica_id  # the Serve replica's id under Ray
        self.registry_token: str | None = None  # the registry change this replica has caught up with
        self._applied: dict[str, DesiredState] = {}  # adapter name -> the desired state applied here
        self._sync_lock = threading.Lock()
        self._catch_up()
        self._stop = threading.Event()
        self._watcher = None
        if watch_interval_s > 0:
            self._watcher = threading.Thread(target=self._watch, args=(watch_interval_s,), daemon=True)
            self._watcher.start()

    # --- batches -------------------------------------------------------------------

    def classify(self, call: ClassifyCall) -> ClassifyResult:
        return raise_if_error(self.classify_many([call])[0])

    def generate(self, call: GenerateCall) -> GenerateResult:
        return raise_if_error(self.generate_many([call])[0])

    def classify_many(self, calls: list[ClassifyCall]) -> list[ClassifyResult | AdapterError]:
        """One forward pass for every input of every call that prepared cleanly."""
        prepared = [self._prepare(call, CLASSIFY_TASKS, self._classify_rows) for call in calls]
        outputs = self._run_isolated(prepared, self.engine.classify)
        return [
            out if isinstance(out, AdapterError) else ClassifyResult(
                p.call.adapter, p.version, p.task, out, sum(len(row.input_ids) for row in p.rows)
            )
            for p, out in zip(prepared, outputs, strict=True)
        ]

    def generate_many(self, calls: list[GenerateCall]) -> list[GenerateResult | AdapterError]:
        """Static batching: one batched decode for every prompt (times n) of every call that
        prepared cleanly."""
        prepared = [self._prepare(call, ("causal_lm",), self._static_rows) for call in calls]
        outputs = self._run_isolated(prepared, self.engine.generate)
        return [
            out if isinstance(out, AdapterError) else GenerateResult(p.call.adapter, p.version, out)
            for p, out in zip(prepared, outputs, strict=True)
        ]

    def _classify_rows(self, call: ClassifyCall, key: str) -> list[ClassifyRow]:
        return [self.engine.encode_classify(text, pair, key) for text, pair in call.inputs]

    def _generate_rows(self, call: GenerateCall, key: str | None) -> list[GenerateRow]:
        prompts = call.prompts
        if call.messages:
            prompts = (self.engine.render_chat([{"role": r, "content": c} for r, c in call.messages]),)
        return [self.engine.encode_prompt(prompt, key, call.sampling) for prompt in prompts]

    def _static_rows(self, call: GenerateCall, key: str | None) -> list[GenerateRow]:
        """One row per choice (the decoder instead runs a prompt's n choices from one prefill)."""
        rows = self._generate_rows(call, key)
        return [replace(row, nth=i) for row in rows for i in range(call.n)]

    def _prepare(self, call, expect: tuple[str, ...], rows_of) -> _Prepared | AdapterError:
        """Resolve and tokenise one call on its own: whatever is wrong with it fails it alone."""
        try:
            if call.adapter is None:
                return _Prepared(call, None, "causal_lm", rows_of(call, None))
            key = self.engine.resolve(call.adapter)
            task = self.engine.task_of(key)
            if task not in expect:
                raise WrongTaskError(
                    f"adapter '{call.adapter}' is a {task} adapter; this route serves {'/'.join(expect)}"
                )
            return _Prepared(call, self.engine.version_of(key), task, rows_of(call, key))
        except AdapterError as err:
            return err
        except Exception:  # noqa: BLE001 - a bug on one call's path must not reach the others
            logger.exception("preparing a call failed")
            return BatchFailedError("this request could not be processed")

    def _run_isolated(self, prepared: list, run) -> list:
        """Run every prepared call's rows as one batch; if that fails, split the calls in
        halves and retry, so only the call that breaks the forward pass fails."""
        good = [i for i, p in enumerate(prepared) if not isinstance(p, AdapterError)]
        out = list(prepared)
        for i, result in self._split_run([prepared[i] for i in good], run, top=True).items():
            out[good[i]] = result
        return out

    def _split_run(self, calls: list[_Prepared], run, top: bool = False) -> dict[int, object]:
        if not calls:
            return {}
        try:
            outputs = iter(run([row for call in calls for row in call.rows]))
            return {i: [next(outputs) for _ in call.rows] for i, call in enumerate(calls)}
        except Exception as err:  # noqa: BLE001 - isolate whatever broke the batch
            if len(calls) == 1:
                if isinstance(err, AdapterError):
                    return {0: err}
                logger.exception("a batch failed for one call alone")
                return {0: BatchFailedError("the model failed on this request")}
        if top:
            self.engine.metrics.batch_split()
            logger.warning("a batch of %d calls failed; retrying them in halves", len(calls))
        half = len(calls) // 2
        first, second = self._split_run(calls[:half], run), self._split_run(calls[half:], run)
        return first | {half + i: result for i, result in second.items()}

    # --- completions, whole or streamed -------------------------------------------------

    async def complete(self, call: GenerateCall) -> GenerateResult:
        return await self.completions.complete(call)

    def stream(self, call: GenerateCall) -> AsyncIterator[DecodeEvent]:
        """A completion's events as they are decoded (choice index, new text, tokens, the end).
        Closing the iterator early cancels the generation: its rows leave the batch."""
        return self.completions.stream(call)

    def _completions(self, batch_generate) -> Completions:
        """Static or continuous batching, as the engine was built (it has a decoder or not)."""
        if self.engine.decoder is not None:
            return ContinuousCompletions(self.engine.decoder, self._prepare_for_decoder)
        return StaticCompletions(batch_generate or self._generate_in_thread)

    async def _generate_in_thread(self, call: GenerateCall) -> GenerateResult | AdapterError:
        return (await asyncio.to_thread(self.generate_many, [call]))[0]

    def _prepare_for_decoder(self, call: GenerateCall) -> tuple[int | None, list[GenerateRow]] | AdapterError:
        prepared = self._prepare(call, ("causal_lm",), self._generate_rows)
        return prepared if isinstance(prepared, AdapterError) else (prepared.version, prepared.rows)

    # --- management ----------------------------------------------------------------

    def load(self, ref: str | AdapterRef, pin: bool = False) -> dict:
        ref = as_ref(ref)
        key = self.engine.load(ref, pin)
        return {"adapter": ref.name, "version": self.engine.version_of(key), "digest": key, "pinned": pin}

    def unload(self, ref: str | AdapterRef) -> dict:
        ref = as_ref(ref)
        return {"adapter": str(ref), "unloaded": self.engine.unload(ref)}

    def reload(self, name: str | None = None) -> dict:
        """New versions of `name`, or (None) a full catch-up with the registry, as the watcher does."""
        if name is not None:
            return {"changed": self.engine.reload(name)}
        with self._sync_lock:
            return {"changed": self._catch_up_to(self.engine.change_token())}

    def status(self) -> dict:
        return self.engine.status() | {"registry_token": self.registry_token}

    def routing_stats(self) -> dict:
        """What this replica tells the routers: the adapters on its device (requests for them
        come here first), the registry change it caught up with, and its bank's hit counts."""
        device, pinned = self.engine.device_adapters()
        return {"registry_token": self.registry_token, "device_adapters": device, "pinned": pinned,
                "bank": dict(self.engine.metrics.bank_totals)}

    def metrics_text(self) -> bytes:
        return self.engine.metrics_text()

    def close(self) -> None:
        self._stop.set()
        if self.engine.decoder is not None:
            self.engine.decoder.close()

    def poll_registry(self, full: bool = False) -> str | None:
        """One watcher step: when the hub's change token moved since this replica last
        caught up (or when `full`), pick up new versions of the adapters in use and apply
        the placements that changed. Returns the token caught up with."""
        with self._sync_lock:
            token = self.engine.change_token()
            if token != self.registry_token or full:
                self._catch_up_to(token)
            return token

    def _catch_up_to(self, token: str | None) -> dict:
        changed = self.engine.reload()
        if changed:
            logger.info("hot-swapped %s", changed)
        self._apply_placements()
        self.registry_token = token
        return changed

    def sync(self) -> dict:
        """Catch up with the registry now (the admin routes' nudge), rather than at the next poll."""
        return {"replica": self.replica_id, "registry_token": self.poll_registry()}

    def _apply_placements(self) -> None:
        """Load, pin or unload what the admins asked every replica to hold. A placement that
        fails here (say, an adapter removed since) is logged and not retried until it changes."""
        for name, placement in self.engine.hub.fleet.all().items():
            if self._applied.get(name) == placement:
                continue
            try:
                if placement.state == "unloaded":
                    self.engine.unload(placement.adapter)
                else:
                    self.engine.load(placement.adapter, pin=placement.state == "pinned")
            except AdapterError as err:
                logger.warning("could not apply placement %s %s: %s", placement.state, placement.ref, err)
            self._applied[name] = placement

    def _catch_up(self) -> None:
        """Before serving: the fleet's placements, so a late or restarted replica comes up like the others."""
        try:
            self.poll_registry(full=True)
        except AdapterError as err:  # an unreachable registry: serve, and catch up on a later poll
            logger.warning("registry not read at start (%s); will catch up on the next poll", err)

    def _watch(self, interval: float) -> None:
        """Poll the registry; a failure (store unreachable) keeps serving resident adapters."""
        polls = 0
        while not self._stop.wait(interval):
            polls += 1
            try:
                # Now and then re-resolve everything anyway: a publisher that crashed
                # between its commit and its token update must not go unnoticed forever.
                self.poll_registry(full=polls % FULL_POLL_EVERY == 0)
            except Exception:  # noqa: BLE001 - the watcher must outlive a flaky store
                logger.warning("registry poll failed; serving resident adapters", exc_info=True)

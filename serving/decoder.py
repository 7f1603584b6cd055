"""Continuous batching for a causal LM, the scheduler's side: a request joins the running decode
batch at the next step after its own prefill, keeps its own adapter (and sampling) every step, and
leaves as soon as it finishes, is cancelled or times out. Which rows run, in which order, and what
their tokens become is decided here; the cache and the forward passes are `runner.ModelRunner`'s.

Each running sequence holds one row of the runner's slotted cache (`max_running` rows ×
`kv_cache_len` positions), its token at position p at position p of its row, so rows of different
lengths share every step with no padding to re-align and nothing to compact. A joining request is
prefilled straight into its free row (or rows, for `n` choices) with its adapter.

A prompt longer than `prefill_chunk` tokens is prefilled a chunk at a time, one chunk between two
decode steps of the running rows, so a long prompt delays their next token by one chunk's forward
pass rather than its whole prefill (chunked prefill). One long prompt prefills at a time; short ones
keep joining beside it.

Why our own loop and not transformers' continuous batching: its manager owns the forward passes and
packs the tokens of many requests into one ragged sequence; we found no supported way to hand each
token its adapter slot there, which every wrapped layer must read. Rows of a slotted cache keep the
per-row slot index the layers already use (rows are the special case of Punica's segments, one token
per row per decode step).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from adapters.errors import AdapterError
from serving.bank import NONE_SLOT
from serving.calls import DecodeEvent
from serving.choice import Choice
from serving.errors import BatchFailedError, InvalidRequestError, OverloadedError
from serving.model import AdapterPlacement
from serving.rows import Sampling
from serving.runner import ModelRunner
from serving.sampling import is_plain_greedy

logger = logging.getLogger(__name__)


@dataclass
class DecodeRequest:
    key: str | None  # adapter content key; None: the bare backbone
    prompt_ids: tuple[int, ...]
    sampling: Sampling
    emit: Callable[[DecodeEvent], None]  # called from the decode thread; must not block
    n: int = 1
    first_index: int = 0  # choice index of this request's first sequence
    tenant: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Prefilling:
    """A long prompt on its way in, a chunk per decode step, into the rows it will decode on."""

    request: DecodeRequest
    slot: int  # its adapter's bank slot, held from the first chunk on
    rows: list[int]  # its cache rows, reserved from the first chunk on (n of them)
    done: int = 0  # prompt tokens prefilled so far


@dataclass
class _Running:
    """One sequence on one cache row."""

    request: DecodeRequest
    choice: Choice  # its sampling, text and finish
    position: int  # position of the next token fed (where its key and value go in the row)
    slot: int  # the adapter's bank slot, held (acquired) while the row runs


class ContinuousDecoder:
    def __init__(self, runner: ModelRunner, tokenizer, placement: AdapterPlacement, max_waiting: int,
                 eos: set[int], prefill_chunk: int | None = None):
        self.runner, self.tokenizer, self.placement = runner, tokenizer, placement
        self.device, self.eos = runner.device, eos
        self.max_running, self.kv_cache_len, self.max_waiting = runner.rows, runner.positions, max_waiting
        self.prefill_chunk = prefill_chunk
        self.prefilling: _Prefilling | None = None
        self.rows: dict[int, _Running] = {}
        self.waiting: deque[DecodeRequest] = deque()
        self.steps = 0
        self._served: dict[str, int] = {}  # tenant -> when it last had a request admitted
        self._admitted = 0
        self._held: dict[int, int] = {}  # id(request) -> sequences still running (its adapter stays acquired)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="decoder", daemon=True)
        self._thread.start()

    # --- the caller's side ---------------------------------------------------------

    def submit(self, request: DecodeRequest) -> None:
        if request.n > self.max_running:
            raise InvalidRequestError(f"n is {request.n}; this replica decodes at most {self.max_running} at once", "n")
        with self._wake:
            if len(self.waiting) >= self.max_waiting:
                raise OverloadedError(f"{len(self.waiting)} generations waiting to start; retry shortly")
            self.waiting.append(request)
            self._wake.notify()

    def running(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    # --- the decode thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closed or self.waiting or self.rows or self.prefilling)
                if self._closed:
                    return
            try:
                self._admit()
                if self.prefilling is not None:
                    self._prefill_chunk()
                if self.rows:
                    self._step()
            except Exception:  # noqa: BLE001 - the loop must survive; the rows it held fail
                logger.exception("a decode step failed; failing the running generations")
                for row in list(self.rows):
                    self._leave(row, error=BatchFailedError("the model failed on this request"))

    def _admit(self) -> None:
        """Start waiting requests while rows are free: fairest first (the tenant running least)."""
        while True:
            with self._wake:
                request = self._next_waiting()
                if request is None:
                    return
            if request.cancelled.is_set():
                continue
            with self._failing_alone(request):
                self._prefill(request)

    @contextlib.contextmanager
    def _failing_alone(self, request: DecodeRequest) -> Iterator[None]:
        """Whatever goes wrong in one request's prefill fails that request, not the others."""
        try:
            yield
        except AdapterError as err:
            request.emit(DecodeEvent(request.first_index, error=err))
        except Exception:  # noqa: BLE001 - one request's prefill must not stop the others
            logger.exception("a prefill failed")
            failed = BatchFailedError("the model failed on this request")
            request.emit(DecodeEvent(request.first_index, error=failed))

    def _is_long(self, request: DecodeRequest) -> bool:
        return self.prefill_chunk is not None and len(request.prompt_ids) > self.prefill_chunk

    def _next_waiting(self) -> DecodeRequest | None:
        reserved = self.prefilling.request.n if self.prefilling else 0
        free = self.max_running - len(self.rows) - reserved
        fitting = [r for r in self.waiting if r.n <= free and not (self.prefilling and self._is_long(r))]
        if not fitting:
            return None
        # Fair between tenants: the one running least, then the one served longest ago; FIFO within.
        running = Counter(row.request.tenant for row in self.rows.values())
        chosen = min(fitting, key=lambda r: (running[r.tenant], self._served.get(r.tenant, -1)))
        self.waiting.remove(chosen)
        self._served[chosen.tenant] = self._admitted
        self._admitted += 1
        return chosen

    def _prefill(self, request: DecodeRequest) -> None:
        """A short prompt in one forward pass; a long one starts its chunks (`_prefill_chunk`)."""
        slot = self.placement.acquire(adapter_keys(request)).get(request.key, NONE_SLOT)  # held until it leaves
        reserved = set(self.prefilling.rows) if self.prefilling else set()
        free = [r for r in range(self.max_running) if r not in self.rows and r not in reserved]
        pending = _Prefilling(request, slot, free[: request.n])
        if self._is_long(request):
            self.prefilling = pending
        else:
            self._prefill_until(pending, len(request.prompt_ids))

    def _prefill_chunk(self) -> None:
        """The next chunk of the long prompt on its way in; it joins the running rows after its last."""
        pending, self.prefilling = self.prefilling, None
        request = pending.request
        if request.cancelled.is_set():
            self.placement.release(adapter_keys(request))
            return
        with self._failing_alone(request):
            if not self._prefill_until(pending, min(pending.done + self.prefill_chunk, len(request.prompt_ids))):
                self.prefilling = pending

    def _prefill_until(self, pending: _Prefilling, end: int) -> bool:
        """Prompt tokens up to `end` into the pending rows; once the whole prompt is in, it joins
        the running rows (True). A failure releases the adapter and propagates."""
        request = pending.request
        try:
            first = pending.rows[0]
            logits = self.runner.prefill(first, request.prompt_ids[pending.done:end], pending.done, pending.slot)
        except BaseException:
            self.placement.release(adapter_keys(request))
            raise
        pending.done = end
        if end < len(request.prompt_ids):
            return False
        self._join(pending, logits)
        return True

    def _join(self, pending: _Prefilling, logits: torch.Tensor) -> None:
        """The prefilled prompt decodes with every other running row from the next step on, on each of
        its rows (the first holds the prompt; the others copy it)."""
        request, rows = pending.request, pending.rows
        length = len(request.prompt_ids)
        self.runner.copy_row(rows[0], rows[1:], length)
        self._held[id(request)] = len(rows)
        for i, row in enumerate(rows):
            choice = Choice(request.sampling, i, request.first_index + i, self.tokenizer, self.eos, self.device)
            self.rows[row] = _Running(request, choice, length, pending.slot)
            self._advance(row, logits, prompt_tokens=length)

    def _step(self) -> None:
        """One token for every running row, each with its own adapter and position. The step runs the
        cache's first rows up to the highest running one (joiners take the lowest free rows); rows in
        between that run nothing are idle in it."""
        count = max(self.rows) + 1
        tokens, positions, slots = [0] * count, [None] * count, [NONE_SLOT] * count
        for row, running in self.rows.items():
            tokens[row], positions[row], slots[row] = running.choice.last, running.position, running.slot
        logits = self.runner.decode(tokens, positions, slots)
        self.steps += 1
        greedy = self._plain_greedy_tokens(logits)
        for row in sorted(self.rows):
            self.rows[row].position += 1
            self._advance(row, logits[row], chosen=greedy.get(row))

    def _plain_greedy_tokens(self, logits: torch.Tensor) -> dict[int, int]:
        """The next token of every plain-greedy row (`is_plain_greedy`), taken in one argmax."""
        rows = [row for row in sorted(self.rows) if is_plain_greedy(self.rows[row].request.sampling)]
        return dict(zip(rows, logits[rows].argmax(-1).tolist(), strict=True)) if rows else {}

    def _advance(self, row: int, logits: torch.Tensor, prompt_tokens: int = 0, chosen: int | None = None) -> None:
        """Pick the row's next token (or take `chosen`) and tell its request; the row leaves when it is done."""
        running = self.rows[row]
        request = running.request
        if request.cancelled.is_set():
            self._leave(row)
            return
        token, logprob = (chosen, None) if chosen is not None else running.choice.choose(logits)
        event = running.choice.accept(token, logprob, prompt_tokens)
        request.emit(event)
        if event.finish_reason:
            self._leave(row)

    def _leave(self, row: int, error: AdapterError | None = None) -> None:
        running = self.rows.pop(row)
        request = running.request
        if error is not None:
            request.emit(DecodeEvent(running.choice.index, error=error))
        self._held[id(request)] -= 1
        if not self._held[id(request)]:
            del self._held[id(request)]
            self.placement.release(adapter_keys(request))


def adapter_keys(request: DecodeRequest) -> list[str]:
    """What the request acquires in the placement: its adapter, or nothing for the bare backbone."""
    return [request.key] if request.key is not None else []

"""Continuous batching for a causal LM: a request joins the running decode batch at the
next step after its own prefill, keeps its own adapter (and sampling) every step, and
leaves as soon as it finishes, is cancelled or times out.

The KV cache is slotted: one row of a preallocated static cache per running sequence
(`max_running` rows × `kv_cache_len` positions). Every step writes all rows' new key and
value at one shared cache position (the write pointer); each row attends only to its own
span through an explicit 4D mask and carries its own position ids, so rows of different
lengths share every step with no padding to re-align. A joining request is prefilled alone
with its adapter, and its prompt's keys and values are written into its free row just
before the pointer: joining copies only its own prompt, leaving copies nothing. When the
pointer reaches the end of the cache every row shifts left together (a compaction, the only
whole-cache copy, once per `kv_cache_len - longest running span` steps).

A prompt longer than `prefill_chunk` tokens is prefilled a chunk at a time, one chunk
between two decode steps of the running rows, so a long prompt delays their next token by
one chunk's forward pass rather than its whole prefill (chunked prefill). One long prompt
prefills at a time; short ones keep joining beside it.

Why our own loop and not transformers' continuous batching: its manager owns the forward
passes and packs the tokens of many requests into one ragged sequence; we found no supported
way to hand each token its adapter slot there, which every wrapped layer must read. Rows of a
slotted cache keep the per-row slot index the layers already use (rows are the special case of
Punica's segments, one token per row per decode step).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, StaticLayer

from adapters.errors import AdapterError
from serving.bank import NONE_SLOT
from serving.detokenize import TextStream
from serving.errors import BatchFailedError, InvalidRequestError, OverloadedError
from serving.model import AdapterPlacement
from serving.rows import Sampling, TokenLogprob
from serving.sampling import choose, generator_for, is_plain_greedy, nth_choice

logger = logging.getLogger(__name__)


class WindowedLayer(StaticLayer):
    """A static cache layer for the decoder: a step writes its key/value at `write_at` for the
    first rows of the cache (as many as the step has), and attention reads only `window`, the
    positions some running row still uses. Both are views: no copy, and a step costs the running
    rows' spans, not the whole cache."""

    write_at = 0
    window = slice(None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, at = key_states.shape[0], slice(self.write_at, self.write_at + key_states.shape[-2])
        self.keys[:rows, :, at] = key_states
        self.values[:rows, :, at] = value_states
        return self.keys[:rows, :, self.window], self.values[:rows, :, self.window]


@dataclass(frozen=True)
class DecodeEvent:
    """What one choice produced in one step (or its end)."""

    index: int
    text: str = ""
    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # set on the choice's last event: stop | length
    prompt_tokens: int = 0
    error: AdapterError | None = None  # the request failed; no more events follow for it


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
    """A long prompt on its way in, a chunk per decode step, in its own cache until it joins."""

    request: DecodeRequest
    slot: int  # its adapter's bank slot, held from the first chunk on
    cache: DynamicCache = field(default_factory=DynamicCache)
    done: int = 0  # prompt tokens prefilled so far


@dataclass
class _Running:
    """One sequence on one cache row."""

    request: DecodeRequest
    index: int
    start: int  # the row's first cache position in use (the attention window starts at the least)
    position: int  # position id of the next token
    text: TextStream
    generator: torch.Generator | None
    slot: int  # the adapter's bank slot, held (acquired) while the row runs
    last: int = 0  # the token to feed next step
    counts: Counter[int] = field(default_factory=Counter)
    made: int = 0


class ContinuousDecoder:
    def __init__(self, model, tokenizer, placement: AdapterPlacement, lock: threading.Lock, device: torch.device,
                 dtype: torch.dtype, max_running: int, kv_cache_len: int, max_waiting: int, eos: set[int],
                 prefill_chunk: int | None = None):
        self.model, self.tokenizer, self.placement, self.lock = model, tokenizer, placement, lock
        self.device, self.dtype, self.eos = device, dtype, eos
        self.max_running, self.kv_cache_len, self.max_waiting = max_running, kv_cache_len, max_waiting
        self.prefill_chunk = prefill_chunk
        self.prefilling: _Prefilling | None = None
        self.cache = self._new_cache()
        self.pointer = 0  # the cache position the next decode step writes
        # valid[row, p]: the row's own key/value sits at cache position p (all else is masked out)
        self.valid = torch.zeros(max_running, kv_cache_len, dtype=torch.bool, device=device)
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
        pending = _Prefilling(request, slot)
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
        """Prompt tokens up to `end` into the pending cache; once the whole prompt is in, it joins
        the running rows (True). A failure releases the adapter and propagates."""
        request = pending.request
        try:
            logits, _ = self._prefill_forward(request, pending.slot, pending.cache, pending.done, end)
        except BaseException:
            self.placement.release(adapter_keys(request))
            raise
        pending.done = end
        if end < len(request.prompt_ids):
            return False
        self._join(request, pending.slot, logits, pending.cache)
        return True

    def _join(self, request: DecodeRequest, slot: int, logits: torch.Tensor, prompt_cache: DynamicCache) -> None:
        """The prefilled prompt's keys and values into free rows just before the pointer; it decodes
        with every other running row from the next step on."""
        length = len(request.prompt_ids)
        self._make_room(length)
        rows = [r for r in range(self.max_running) if r not in self.rows][: request.n]
        start = self.pointer - length
        for layer, prompt in zip(self.cache.layers, prompt_cache.layers, strict=True):
            layer.keys[rows, :, start:self.pointer] = prompt.keys[0]
            layer.values[rows, :, start:self.pointer] = prompt.values[0]
        self.valid[rows] = False
        self.valid[rows, start:self.pointer] = True
        self._held[id(request)] = len(rows)
        for i, row in enumerate(rows):
            self.rows[row] = _Running(request, request.first_index + i, start, length,
                                      TextStream(self.tokenizer, request.sampling.stop),
                                      generator_for(nth_choice(request.sampling, i), self.device), slot)
            self._advance(row, logits, prompt_tokens=length)

    @torch.inference_mode()
    def _prefill_forward(self, request: DecodeRequest, slot: int, cache: DynamicCache, begin: int,
                         end: int) -> tuple[torch.Tensor, DynamicCache]:
        """Prompt tokens [begin, end) on top of `cache` (holding the ones before), alone with the adapter."""
        ids = torch.tensor([request.prompt_ids[begin:end]], device=self.device)
        with self.lock:
            self.placement.set_slot_index(torch.tensor([slot], device=self.device))
            try:
                out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
            finally:
                self.placement.set_slot_index(None)
        return out.logits[0, -1], out.past_key_values

    @torch.inference_mode()
    def _step(self) -> None:
        """One token for every running row, each with its own adapter, position and span. The step
        runs the cache's first rows up to the highest running one (joiners take the lowest free row)."""
        self._make_room(0)
        count = max(self.rows) + 1
        last, position, slot = [0] * count, [0] * count, [NONE_SLOT] * count
        for row, running in self.rows.items():
            last[row], position[row], slot[row] = running.last, running.position, running.slot
        # one host-to-device copy each: on a GPU a scalar write per row costs a launch per row
        ids, positions, slot_index = (torch.tensor(values, dtype=torch.long, device=self.device)
                                      for values in (last, position, slot))
        ids, positions = ids[:, None], positions[:, None]
        self.valid[:count, self.pointer] = True  # every row writes this step's key/value here (idle rows: only this)
        window = slice(min(r.start for r in self.rows.values()), self.pointer + 1)
        mask = torch.zeros(count, 1, 1, window.stop - window.start, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~self.valid[:count, None, None, window], torch.finfo(self.dtype).min)
        for layer in self.cache.layers:
            layer.write_at, layer.window = self.pointer, window
        with self.lock:
            self.placement.set_slot_index(slot_index)
            try:
                out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                                 past_key_values=self.cache, use_cache=True)
            finally:
                self.placement.set_slot_index(None)
        idle = [r for r in range(count) if r not in self.rows]
        self.valid[idle, self.pointer] = False
        self.pointer += 1
        self.steps += 1
        greedy = self._plain_greedy_tokens(out.logits[:, -1])
        for row in sorted(self.rows):
            self.rows[row].position += 1
            self._advance(row, out.logits[row, -1], chosen=greedy.get(row))

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
        token, logprob = (chosen, None) if chosen is not None else choose(
            logits, request.sampling, running.generator, running.counts, self.tokenizer)
        finish = None
        piece = ""
        if token in self.eos:
            finish = "stop"
        else:
            running.made += 1
            running.counts[token] += 1
            running.last = token
            piece = running.text.push(token)
            if running.text.stopped:
                finish = "stop"
            elif running.made >= request.sampling.max_tokens:
                finish = "length"
        if finish:
            piece += running.text.finish()
        tokens = (token,) if token not in self.eos else ()
        request.emit(DecodeEvent(running.index, piece, tokens, (logprob,) if logprob and tokens else (), finish,
                                 prompt_tokens))
        if finish:
            self._leave(row)

    def _leave(self, row: int, error: AdapterError | None = None) -> None:
        running = self.rows.pop(row)
        self.valid[row] = False
        request = running.request
        if error is not None:
            request.emit(DecodeEvent(running.index, error=error))
        self._held[id(request)] -= 1
        if not self._held[id(request)]:
            del self._held[id(request)]
            self.placement.release(adapter_keys(request))

    def _make_room(self, prompt_length: int) -> None:
        """Make the pointer a writable position with `prompt_length` positions before it: pack
        every row's tokens to end just before the pointer when the cache is full (the one
        whole-cache copy), and jump forward when a joining prompt needs more room before it
        (free: each row sees only its own valid positions)."""
        if self.pointer >= self.kv_cache_len:
            self._compact()
        self.pointer = max(self.pointer, prompt_length)

    def _compact(self) -> None:
        held = {row: self.valid[row].nonzero().squeeze(-1) for row in self.rows}
        end = max((len(where) for where in held.values()), default=0)
        for layer in self.cache.layers:
            for row, where in held.items():  # gather first: source and target ranges may overlap
                keys, values = layer.keys[row, :, where].clone(), layer.values[row, :, where].clone()
                layer.keys[row, :, end - len(where):end] = keys
                layer.values[row, :, end - len(where):end] = values
        self.valid.zero_()
        for row, where in held.items():
            self.valid[row, end - len(where):end] = True
            self.rows[row].start = end - len(where)
        self.pointer = end

    def _new_cache(self) -> Cache:
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache = Cache(layers=[WindowedLayer(max_cache_len=self.kv_cache_len) for _ in range(config.num_hidden_layers)])
        cache.early_initialization(self.max_running, heads, head_dim, self.dtype, self.device)
        return cache


def adapter_keys(request: DecodeRequest) -> list[str]:
    """What the request acquires in the placement: its adapter, or nothing for the bare backbone."""
    return [request.key] if request.key is not None else []


def kv_bytes_per_position(model_config, dtype: torch.dtype) -> int:
    """Bytes one cache position of one sequence takes: keys and values of every layer."""
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return 2 * model_config.num_hidden_layers * heads * head_dim * dtype.itemsize

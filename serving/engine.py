"""The serving engine, free of Ray: one frozen backbone, many adapters, one forward per batch.

Requests arrive as rows that each name an adapter by content key (or None for
the bare backbone). The engine pins the rows' adapters in the bank, sets the
per-row slot index every wrapped layer reads, runs one padded forward pass, and
applies each row's task head. Causal LMs decode step by step with every row
keeping its own adapter through the whole generation.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from adapters.config import AdapterConfig
from adapters.errors import AdapterConfigError, AdapterError
from adapters.store.hub import AdapterHub
from adapters.store.names import AdapterRef, as_ref
from backbones.chat import render_chat
from backbones.loading import load_tokenizer, pick_device
from backbones.shipped import resolve_model_dir
from serving.bank import NONE_SLOT
from serving.catalog import AdapterCatalog
from serving.config import EngineConfig
from serving.decoder import ContinuousDecoder
from serving.errors import ContextLengthError, InvalidRequestError, WrongTaskError
from serving.generation import generate
from serving.graphs import EncoderGraphs
from serving.metrics import EngineMetrics
from serving.model import build_serving_model
from serving.rows import ClassifyRow, GenerateRow, Generation, Prediction, Sampling
from serving.runner import ModelRunner, kv_bytes_per_position

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def serving_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA (half float32's memory traffic, and the tensor cores' own type);
    float32 on the CPU, which has no fast bfloat16 matmul on most hosts."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


class Engine:
    def __init__(self, config: EngineConfig, hub: AdapterHub | None = None, metrics: EngineMetrics | None = None):
        self.config = config
        self.metrics = metrics or EngineMetrics()
        self.device = pick_device(config.device)
        self.dtype = serving_dtype(config.dtype, self.device)
        self.hub = hub or AdapterHub(config.hub)
        self._lock = threading.Lock()  # one forward at a time: the device is saturated anyway
        self._tokenizer_lock = threading.Lock()
        self._setup_adapters()

    def _setup_adapters(self) -> None:
        """The backbone with its adapters placed: a bank (mixed) or its own weights (merged)."""
        model_dir = resolve_model_dir(self.config.model)
        catalog_for = functools.partial(AdapterCatalog, self.hub)
        on_event = self.metrics.bank_event
        built = build_serving_model(model_dir, self.config, catalog_for, self.device, self.dtype, on_event)
        self.model, self.placement, self.catalog = built.model, built.placement, built.source
        shape = built.shape
        self.backbone, self.hidden_size, self.is_causal = shape.ref, shape.hidden_size, shape.is_causal
        self.tokenizer = load_tokenizer(model_dir)
        self.tokenizer.padding_side = "left" if self.is_causal else "right"
        if self.config.mode == "merged" and self.config.merged_adapter:
            self.load(self.config.merged_adapter)
        configured = self.model.generation_config.eos_token_id if self.is_causal else None
        configured = [configured] if isinstance(configured, int) else configured or []
        self.eos = {self.tokenizer.eos_token_id, *configured} - {None}
        # A merged replica holds one adapter in its weights: it keeps static batches (one adapter each).
        continuous = self.is_causal and self.config.batching == "continuous" and self.config.mode == "mixed"
        self.decoder = self._new_decoder() if continuous else None
        self.graphs = self._new_graphs()

    def _new_graphs(self) -> EncoderGraphs | None:
        """CUDA graphs for a mixed encoder's classify forwards, when asked for and on a GPU."""
        if not self.config.cuda_graphs or self.is_causal or self.config.mode != "mixed":
            return None
        if self.device.type != "cuda":
            logger.info("cuda_graphs asks for a GPU; this replica runs on %s, eagerly", self.device)
            return None
        return EncoderGraphs(self.model, self.placement.set_slot_index, self.device, self.context_length)

    def _new_decoder(self) -> ContinuousDecoder:
        """Rows x positions within the memory budget: the model's own context unless capped."""
        positions = self.config.kv_cache_len or self.model_context + 1
        per_row = positions * kv_bytes_per_position(self.model.config, self.dtype)
        rows = max(1, min(self.config.max_running, int(self.config.kv_cache_gib * 2**30 // per_row)))
        if rows < self.config.max_running:
            logger.info("KV cache: %d rows of %d positions fit %.1f GiB (max_running %d)", rows, positions,
                        self.config.kv_cache_gib, self.config.max_running)
        graphs = self.config.cuda_graphs and self.device.type == "cuda"
        runner = ModelRunner(self.model, self.placement.set_slot_index, self._lock, self.device, self.dtype, rows,
                             positions, graphs=graphs, compile=self.config.compile_decode and not graphs)
        return ContinuousDecoder(runner, self.tokenizer, self.placement, self.config.max_waiting, self.eos,
                                 self.config.prefill_chunk_tokens)

    # --- adapters ----------------------------------------------------------------

    def resolve(self, ref: str | AdapterRef) -> str:
        """Content key of the version `ref` means now (bare names: the version in use)."""
        return self.catalog.resolve(as_ref(ref)).digest

    def task_of(self, key: str) -> str:
        """The adapter's task, read without taking a device slot (the host tier holds it)."""
        return self.placement.config(key).task_type

    def version_of(self, key: str) -> int:
        return self.catalog.version_of(key).version

    def change_token(self) -> str | None:
        """The registry's change token: it moves whenever any adapter is published or removed."""
        return self.catalog.hub.changes.read()

    def status(self) -> dict:
        return {
            "running_sequences": self.decoder.running() if self.decoder else 0,
            "decode_steps": self.decoder.steps if self.decoder else 0,
            "backbone": self.backbone.name,
            "causal_lm": self.is_causal,
            "device": str(self.device),
            "resident": self.placement.resident(),
            "adapters": {name: v.version for name, v in self.catalog.in_use().items()},
        }

    def device_adapters(self) -> tuple[list[str], list[str]]:
        """(names with a version on the device, the pinned ones among them). Any version counts: the
        routers send every version of a name to the same replicas, and a fine-tuned model is called by
        its exact `@N` ref, which never becomes the name's version in use."""
        keys, pinned = self.placement.on_device()
        return self.catalog.names_of(keys), self.catalog.names_of(pinned)

    def metrics_text(self) -> bytes:
        return self.metrics.exposition(self.placement.resident())

    def load(self, ref: str | AdapterRef, pin: bool = False) -> str:
        key = self.resolve(ref)
        with self._lock:
            self.placement.load(key, pin=pin)
        return key

    def unload(self, ref: str | AdapterRef) -> bool:
        key = self.resolve(ref)
        self.catalog.forget(as_ref(ref).name)
        with self._lock:
            return self.placement.unload(key)

    def reload(self, name: str | None = None) -> dict[str, tuple[int | None, int]]:
        """Pick up new versions from the registry; old ones finish their in-flight batches.

        A new version is validated and resident before the name switches to it, so a
        corrupt one never serves: the old stays. Reloading one `name` raises its error;
        the all-names poll logs it and goes on with the others.
        """
        swapped = {}
        for each, (old, new) in self.catalog.refresh(name).items():
            try:
                with self._lock:  # a merged swap must not run under a forward pass
                    pinned = old is not None and old.digest in self.placement.on_device()[1]
                    self.placement.load(new.digest, pin=pinned)  # a pin follows the name to its new version
            except AdapterError as err:
                self.metrics.version_rejected()
                if name is not None:
                    raise
                logger.warning("refused %s@%d, still serving the version in use: %s", each, new.version, err)
                continue
            self.catalog.switch(each, new)
            if old is not None:
                with self._lock:
                    self.placement.unload(old.digest)
            swapped[each] = (old.version if old else None, new.version)
        return swapped

    @contextlib.contextmanager
    def _adapters(self, keys: Sequence[str | None]) -> Iterator[dict[str | None, int]]:
        real = [k for k in keys if k is not None]
        if len(real) < len(keys) and not self.placement.serves_bare:
            raise AdapterConfigError(
                "this replica has an adapter merged into its weights; it cannot serve the bare model"
            )
        slots = self.placement.acquire(real)
        try:
            yield {None: NONE_SLOT, **slots}
        finally:
            self.placement.release(real)

    def _slot_index(self, slots: dict, keys: Sequence[str | None]) -> torch.Tensor | None:
        """Each row's slot, or None when no row has an adapter: every layer then runs its bare GEMM
        alone (decided here once per batch, not per layer)."""
        if all(key is None for key in keys):
            return None
        return torch.tensor([slots[k] for k in keys], device=self.device)

    @contextlib.contextmanager
    def _rows_use(self, slots: dict, keys: Sequence[str | None]) -> Iterator[None]:
        self.placement.set_slot_index(self._slot_index(slots, keys))
        try:
            yield
        finally:
            self.placement.set_slot_index(None)

    # --- inputs: tokenised per call, before any batch ----------------------------

    @property
    def context_length(self) -> int:
        """Most tokens one row may hold: the configured cap, else the model's own context."""
        own = self.model_context
        if self.decoder is not None:  # a running sequence must fit its cache row, with the write position
            own = min(own, self.decoder.kv_cache_len - 1)
        return min(self.config.max_input_tokens or own, own)

    @property
    def model_context(self) -> int:
        return getattr(self.model.config, "max_position_embeddings", None) or 2048

    def encode_classify(self, text: str, text_pair: str | None, key: str) -> ClassifyRow:
        """One classification input as token ids; raises for this input alone."""
        encoded = self._tokenize(text, text_pair)
        ids = encoded["input_ids"]
        if len(ids) > self.context_length:
            raise ContextLengthError(
                f"an input has {len(ids)} tokens; this model's context is {self.context_length} tokens", "inputs"
            )
        types = encoded.get("token_type_ids")
        return ClassifyRow(key, tuple(ids), tuple(types) if types is not None else None)

    def encode_prompt(self, prompt: str, key: str | None, sampling: Sampling) -> GenerateRow:
        """One prompt as token ids; the prompt and its new tokens must fit the context."""
        ids = self._tokenize(prompt)["input_ids"]
        if not ids:
            raise InvalidRequestError("the prompt holds no tokens", "prompt")
        self._check_logit_bias(sampling)
        if sampling.to_context and len(ids) < self.context_length:
            sampling = replace(sampling, max_tokens=min(sampling.max_tokens, self.context_length - len(ids)),
                               to_context=False)
        if len(ids) + sampling.max_tokens > self.context_length:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens and max_tokens is {sampling.max_tokens}; this model's "
                f"context is {self.context_length} tokens",
                "prompt",
            )
        return GenerateRow(key, tuple(ids), sampling)

    def _check_logit_bias(self, sampling: Sampling) -> None:
        """A token id outside the vocabulary is the client's mistake (OpenAI answers 400 too)."""
        vocab = getattr(self.model.config, "vocab_size", None) or len(self.tokenizer)  # the logits' width
        outside = sorted(token for token, _ in sampling.logit_bias if token >= vocab)
        if outside:
            raise InvalidRequestError(f"logit_bias names token {outside[0]}; this model's vocabulary has {vocab} "
                                      f"tokens (0-{vocab - 1})", "logit_bias")

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The backbone's own chat template, rendered as a prompt string."""
        with self._tokenizer_lock:
            return render_chat(self.tokenizer, messages)

    def _tokenize(self, text: str, text_pair: str | None = None) -> dict[str, list[int]]:
        try:
            with self._tokenizer_lock:  # a fast tokenizer is not safe to share between threads
                return dict(self.tokenizer(text, text_pair, truncation=False, verbose=False))
        except (TypeError, ValueError, UnicodeError):
            # e.g. a lone surrogate: the Rust tokenizer refuses it with a TypeError
            raise InvalidRequestError("an input could not be tokenised (is it valid Unicode text?)") from None

    # --- classification ----------------------------------------------------------

    @torch.inference_mode()
    def classify(self, rows: Sequence[ClassifyRow]) -> list[Prediction]:
        if self.is_causal:
            raise WrongTaskError("this replica serves a causal LM: use completions")
        keys = [row.key for row in rows]
        self.metrics.observe_batch(len(rows), len(set(keys)), self.placement.resident)
        with self._lock, self._adapters(keys) as slots:
            encoded = self._pad(rows).to(self.device)
            if self.graphs is not None:
                pooled = self.graphs.pooled(dict(encoded), self._slot_index(slots, keys))
            else:
                with self._rows_use(slots, keys):
                    pooled = self.model(**encoded).pooler_output
            return self._apply_heads(pooled, keys, slots)

    # --- generation ----------------------------------------------------------------

    def generate(self, rows: Sequence[GenerateRow]) -> list[Generation]:
        if not self.is_causal:
            raise WrongTaskError("this replica serves an encoder: use classify")
        keys = [row.key for row in rows]
        self.metrics.observe_batch(len(rows), len(set(keys)), self.placement.resident)
        with self._lock, self._adapters(keys) as slots, self._rows_use(slots, keys):
            return generate(self.model, self.tokenizer, rows, self.eos)

    def _pad(self, rows: Sequence[ClassifyRow]):
        features = []
        for row in rows:
            feature = {"input_ids": list(row.input_ids)}
            if row.token_type_ids is not None:
                feature["token_type_ids"] = list(row.token_type_ids)
            features.append(feature)
        return self.tokenizer.pad(features, return_tensors="pt")

    def _apply_heads(self, pooled: torch.Tensor, keys: list[str], slots: dict) -> list[Prediction]:
        """Each row through its own adapter's head, one small GEMM per distinct adapter."""
        out: list[Prediction | None] = [None] * len(keys)
        for key in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            weight, bias = self.placement.head(slots[key])
            logits = F.linear(pooled[rows], weight, bias).float().cpu()
            config = self.placement.config(key)
            for row, row_logits in zip(rows, logits, strict=True):
                out[row] = _prediction(config, row_logits)
        return out


def _prediction(config: AdapterConfig, logits: torch.Tensor) -> Prediction:
    if config.task_type == "regression":
        return Prediction(label=None, scores=None, value=float(logits[0]))
    probs = logits.softmax(-1).tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    return Prediction(label=config.labels[best], scores=dict(zip(config.labels, probs, strict=True)))

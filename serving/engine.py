"""The serving engine, free of Ray: one frozen backbone, many adapters, one forward per batch.

Requests arrive as rows that each name an adapter by content key (or None for
the bare backbone). The engine pins the rows' adapters in the bank, sets the
per-row slot index every wrapped layer reads, runs one padded forward pass, and
applies each row's task head. Causal LMs decode step by step with every row
keeping its own adapter through the whole generation.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from adapters.backbones import backbone_ref, load_tokenizer, pick_device, resolve_model_dir
from adapters.config import AdapterConfig, DCFTConfig
from adapters.errors import AdapterConfigError, AdapterError
from adapters.injection import attach_banks, wrap_layers
from adapters.loading import layer_dims
from adapters.registry import AdapterHub
from serving.bank import NONE_SLOT, AdapterBank
from serving.catalog import AdapterCatalog
from serving.config import EngineConfig
from serving.generation import generate
from serving.merged import MergedPlacement
from serving.metrics import EngineMetrics
from serving.rows import ClassifyRow, GenerateRow, Generation, Prediction

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_causal_lm(model_config) -> bool:
    return any(
        arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel") for arch in model_config.architectures or []
    )


class Engine:
    def __init__(self, config: EngineConfig, hub: AdapterHub | None = None, metrics: EngineMetrics | None = None):
        self.config = config
        self.metrics = metrics or EngineMetrics()
        self.device = pick_device(config.device)
        self.dtype = DTYPES[config.dtype]
        model_dir = resolve_model_dir(config.model)
        model_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        self.is_causal = is_causal_lm(model_config)
        self.tokenizer = load_tokenizer(model_dir)
        self.tokenizer.padding_side = "left" if self.is_causal else "right"
        auto = AutoModelForCausalLM if self.is_causal else AutoModel
        self.model = auto.from_pretrained(model_dir, dtype=self.dtype, local_files_only=True).to(self.device).eval()
        self.model.requires_grad_(False)
        self.backbone = backbone_ref(model_dir, self.model.config)
        self.hidden_size = self.model.config.hidden_size
        self.hub = hub or AdapterHub(config.hub)
        self._lock = threading.Lock()  # one forward at a time: the device is saturated anyway
        self._setup_adapters()

    def _setup_adapters(self) -> None:
        """Mixed: wrap the target layers and give them a bank. Merged: one adapter in the weights."""
        if self.config.mode == "merged":
            self.catalog = AdapterCatalog(self.hub, self.backbone, layer_dims(self.model), self.hidden_size)
            self.bank = MergedPlacement(self.model, self.catalog.load, self.device, self.dtype, self.metrics.bank_event)
            if self.config.merged_adapter:
                self.load(self.config.merged_adapter)
            return
        shape = DCFTConfig(kernel_size=self.config.kernel_size, rank=self.config.max_rank, targets=self.config.targets)
        names = wrap_layers(self.model, shape, own_adapter=False)
        dims = {name: dim for name, dim in layer_dims(self.model).items() if name in names}
        self.catalog = AdapterCatalog(self.hub, self.backbone, dims, self.hidden_size)
        self.bank = AdapterBank(
            dims, self.config.kernel_size, self.config.max_rank, self.config.device_slots, self.config.host_capacity,
            self.catalog.load, self.device, self.dtype, on_event=self.metrics.bank_event,
        )  # fmt: skip
        attach_banks(self.model, self.bank.layers)

    # --- adapters ----------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """Content key of the version `ref` means now (bare names: the version in use)."""
        return self.catalog.resolve(ref).digest

    def adapter_config(self, key: str) -> AdapterConfig:
        with self._adapters([key]):
            return self.bank.config(key)

    def load(self, ref: str, pin: bool = False) -> str:
        key = self.resolve(ref)
        with self._lock:
            self.bank.load(key, pin=pin)
        return key

    def unload(self, ref: str) -> bool:
        key = self.resolve(ref)
        self.catalog.forget(ref)
        with self._lock:
            return self.bank.unload(key)

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
                    self.bank.load(new.digest)
            except AdapterError as err:
                self.metrics.version_rejected()
                if name is not None:
                    raise
                logger.warning("refused %s@%d, still serving the version in use: %s", each, new.version, err)
                continue
            self.catalog.switch(each, new)
            if old is not None:
                with self._lock:
                    self.bank.unload(old.digest)
            swapped[each] = (old.version if old else None, new.version)
        return swapped

    @contextlib.contextmanager
    def _adapters(self, keys: Sequence[str | None]) -> Iterator[dict[str | None, int]]:
        real = [k for k in keys if k is not None]
        if len(real) < len(keys) and not self.bank.serves_bare:
            raise AdapterConfigError(
                "this replica has an adapter merged into its weights; it cannot serve the bare model"
            )
        slots = self.bank.acquire(real)
        try:
            yield {None: NONE_SLOT, **slots}
        finally:
            self.bank.release(real)

    @contextlib.contextmanager
    def _rows_use(self, slots: dict, keys: Sequence[str | None]) -> Iterator[None]:
        self.bank.batch.slot_index = torch.tensor([slots[k] for k in keys], device=self.device)
        try:
            yield
        finally:
            self.bank.batch.slot_index = None

    # --- classification ----------------------------------------------------------

    @torch.inference_mode()
    def classify(self, rows: Sequence[ClassifyRow]) -> list[Prediction]:
        if self.is_causal:
            raise AdapterConfigError("this replica serves a causal LM: use completions")
        keys = [row.key for row in rows]
        self.metrics.observe_batch(len(rows), len(set(keys)), self.bank.resident)
        with self._lock, self._adapters(keys) as slots:
            encoded = self._encode(rows).to(self.device)
            with self._rows_use(slots, keys):
                pooled = self.model(**encoded).pooler_output
            return self._apply_heads(pooled, keys, slots)

    # --- generation ----------------------------------------------------------------

    def generate(self, rows: Sequence[GenerateRow]) -> list[Generation]:
        if not self.is_causal:
            raise AdapterConfigError("this replica serves an encoder: use classify")
        keys = [row.key for row in rows]
        self.metrics.observe_batch(len(rows), len(set(keys)), self.bank.resident)
        with self._lock, self._adapters(keys) as slots, self._rows_use(slots, keys):
            return generate(self.model, self.tokenizer, rows, self.config.max_input_tokens)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The backbone's own chat template, rendered as a prompt string."""
        if not self.tokenizer.chat_template:
            return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _encode(self, rows: Sequence[ClassifyRow]):
        """Tokenize singles and text pairs apart (one tokenizer call cannot mix them), then pad together."""
        features: list[dict] = [{}] * len(rows)
        for has_pair in (False, True):
            index = [i for i, row in enumerate(rows) if (row.text_pair is not None) == has_pair]
            if not index:
                continue
            texts = [rows[i].text for i in index]
            pairs = [rows[i].text_pair for i in index] if has_pair else None
            encoded = self.tokenizer(texts, pairs, truncation=True, max_length=self.config.max_input_tokens)
            for j, i in enumerate(index):
                features[i] = {key: values[j] for key, values in encoded.items()}
        return self.tokenizer.pad(features, return_tensors="pt")

    def _apply_heads(self, pooled: torch.Tensor, keys: list[str], slots: dict) -> list[Prediction]:
        """Each row through its own adapter's head, one small GEMM per distinct adapter."""
        out: list[Prediction | None] = [None] * len(keys)
        for key in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            weight, bias = self.bank.head(slots[key])
            logits = F.linear(pooled[rows], weight, bias).float().cpu()
            config = self.bank.config(key)
            for row, row_logits in zip(rows, logits, strict=True):
                out[row] = _prediction(config, row_logits)
        return out


def _prediction(config: AdapterConfig, logits: torch.Tensor) -> Prediction:
    if config.task_type == "regression":
        return Prediction(label=None, scores=None, value=float(logits[0]))
    probs = logits.softmax(-1).tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    return Prediction(label=config.labels[best], scores=dict(zip(config.labels, probs, strict=True)))

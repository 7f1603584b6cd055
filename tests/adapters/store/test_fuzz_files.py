"""Adapter files and hub names under fuzzing (hypothesis).

Every mutation of one valid tiny adapter (truncation, bit flips, header lengths,
generated headers with huge shapes, duplicate keys, NaN/Inf, wrong dtypes, odd
tensor names, wrong-typed config fields) must either load or raise one
`AdapterError` subclass, never another exception; a rejected file leaves the model
and the hub exactly as they were, and a declared 100 GB tensor allocates nothing.
Hub names must match the safe pattern or raise `RegistryError`, and nothing is
ever written outside the hub directory.

`pytest -s tests/adapters/store/test_fuzz_files.py` prints the cases tried per fuzz target.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import resource
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from adapters.errors import AdapterError, AdapterFileError, RegistryError
from adapters.injection import adapter_state
from adapters.layer import DCFTLinear
from adapters.store.files import CONFIG_NAME, WEIGHTS_NAME
from adapters.store.hub import AdapterHub
from adapters.store.loading import layer_dims, load_adapter
from backbones.loading import backbone_ref, load_backbone
from benchmarks.fixtures import random_adapter, tiny_bert_dir
from serving.catalog import read_host_adapter

GiB = 1 << 30
# No "explain" phase: it traces every line of a failing case, minutes on these inputs.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
ALLOWED_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
DTYPE_NAMES = [*ALLOWED_DTYPES, "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "f32", ""]
SAFE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}/[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
# Path tricks, separators, NUL, bidi/zero-width marks, full-width and Cyrillic look-alikes.
TRICKS = [
    "..", "../..", "../../etc/passwd", "/etc/passwd", "/", "\\", "C:\\Windows", "~", "", " ", "\x00", "a\x00b",
    "%2e%2e", "ｃｌａｓｓｉｆｉｅｒ", "classifier\u200b", "\u202eclassifier", "cla\u0455sifier", "classifier.",
    ".classifier", "__metadata__", "encoder.layer.0..attention.self.query", "encoder.layer.99.attention.self.query",
]


# --- running a target and counting its cases -------------------------------------------


def run_target(name: str, strategy: st.SearchStrategy, check: Callable, max_examples: int, record_property) -> int:
    """Run `check` on `max_examples` generated cases; print and record how many were tried."""
    tried = 0

    @settings(
        max_examples=max_examples, deadline=None, database=None, print_blob=True, phases=PHASES,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(strategy)
    def target(case):
        nonlocal tried
        tried += 1
        note(f"case: {case!r}")
        check(case)

    target()
    print(f"\nfuzz target {name}: {tried} cases")
    record_property(f"fuzz cases: {name}", tried)
    return tried


# --- the valid adapter and the pristine model ------------------------------------------


@dataclass(frozen=True)
class Files:
    """The bytes of an adapter directory; `must_fail` when no reader may accept them."""

    config: bytes
    weights: bytes
    must_fail: bool = False

    def __repr__(self) -> str:  # the bytes can be MBs: show their sizes and how they start
        return (f"Files(config={self.config[:1500]!r}... ({len(self.config)} B), "
                f"weights={self.weights[:200]!r}... ({len(self.weights)} B), must_fail={self.must_fail})")

    def _repr_pretty_(self, printer, cycle) -> None:  # what hypothesis prints for a failing case
        printer.text(repr(self))


@dataclass
class Pristine:
    state: dict[str, torch.Tensor]
    requires_grad: list[bool]


class Bench:
    """One valid adapter, a pristine backbone to load it into, and a scratch directory."""

    def __init__(self, root: Path):
        bert = tiny_bert_dir(root / "bert")
        valid_dir = random_adapter(bert, root / "valid", "seq_cls", seed=1, kernel=4)
        self.valid = Files((valid_dir / CONFIG_NAME).read_bytes(), (valid_dir / WEIGHTS_NAME).read_bytes())
        self.valid_dir, self.case_dir = valid_dir, root / "case"
        self.base = load_backbone(bert, "seq_cls", 2)
        self.pristine = Pristine({k: v.clone() for k, v in self.base.state_dict().items()},
                                 [p.requires_grad for p in self.base.parameters()])
        self._spare: torch.nn.Module | None = None
        ids = torch.randint(0, self.base.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
        self.ids = ids.to(self.base.device)
        self.reference = self.logits(self.load_valid())
        self.backbone = backbone_ref(bert, self.base.config)
        self.dims, self.hidden = layer_dims(self.base), self.base.config.hidden_size
        self.tensors = load_safetensors_bytes(self.valid.weights)

    def take_model(self) -> torch.nn.Module:
        """A model in the pristine state: the last one a rejected file left untouched, or a fresh copy."""
        model, self._spare = self._spare or copy.deepcopy(self.base), None
        return model

    def give_back(self, model: torch.nn.Module) -> None:
        """Keep a model for the next case once it is checked to be pristine (copies are the slow part)."""
        assert_untouched(model, self.pristine)
        self._spare = model

    def load_valid(self) -> torch.nn.Module:
        model = copy.deepcopy(self.base)
        load_adapter(model, self.valid_dir)
        return model

    def logits(self, model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=self.ids).logits

    def write(self, files: Files) -> Path:
        self.case_dir.mkdir(exist_ok=True)
        (self.case_dir / CONFIG_NAME).write_bytes(files.config)
        (self.case_dir / WEIGHTS_NAME).write_bytes(files.weights)
        return self.case_dir


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Bench:
    return Bench(tmp_path_factory.mktemp("fuzz-files"))


# --- the property every reader keeps ---------------------------------------------------


def assert_untouched(model: torch.nn.Module, pristine: Pristine) -> None:
    assert not any(isinstance(m, DCFTLinear) for m in model.modules()), "a rejected adapter was injected"
    state = model.state_dict()
    assert state.keys() == pristine.state.keys(), "a rejected adapter changed the model's modules"
    changed = [k for k, v in pristine.state.items() if not torch.equal(v, state[k])]
    assert not changed, f"a rejected adapter changed {changed[:3]}"
    flags = [p.requires_grad for p in model.parameters()]
    assert flags == pristine.requires_grad, "a rejected adapter changed which parameters train"


def assert_loaded_as_written(model: torch.nn.Module, heads: list[str], weights: bytes) -> None:
    """An accepted file is applied verbatim: every tensor in it, and nothing else."""
    written = load_safetensors_bytes(weights)
    loaded = adapter_state(model, heads)
    assert loaded.keys() == written.keys()
    for name, tensor in written.items():
        assert torch.equal(loaded[name], tensor.to(loaded[name].device, loaded[name].dtype)), name


def check_readers(bench: Bench, files: Files) -> None:
    """load_adapter and the serving reader: success, or one AdapterError with nothing changed."""
    case_dir = bench.write(files)
    model = bench.take_model()
    try:
        config = load_adapter(model, case_dir)
        accepted = True
    except AdapterError:
        bench.give_back(model)
        accepted = False
    if accepted:
        assert_loaded_as_written(model, config.head_modules, files.weights)
        if (files.config, files.weights) == (bench.valid.config, bench.valid.weights):
            assert torch.equal(bench.logits(model), bench.reference)
    try:
        read_host_adapter(case_dir, "fuzz", bench.backbone, bench.dims, bench.hidden)
        served = True
    except AdapterError:
        served = False
    assert not (files.must_fail and (accepted or served)), "a file that must be rejected was accepted"


# --- byte-level mutations ----------------------------------------------------------------


FILE = st.sampled_from(["config", "weights"])


@st.composite
def truncated(draw, valid: Files) -> Files:
    which = draw(FILE)
    blob = getattr(valid, which)
    return replace(valid, **{which: blob[: draw(st.integers(0, len(blob) - 1))]}, must_fail=True)


@st.composite
def bit_flipped(draw, valid: Files) -> Files:
    which = draw(FILE)
    blob = bytearray(getattr(valid, which))
    for _ in range(draw(st.integers(1, 8))):
        blob[draw(st.integers(0, len(blob) - 1))] ^= 1 << draw(st.integers(0, 7))
    return replace(valid, **{which: bytes(blob)})


@st.composite
def wrong_header_length(draw, valid: Files) -> Files:
    (true_len,) = struct.unpack("<Q", valid.weights[:8])
    declared = draw(st.one_of(st.integers(0, 2 * true_len), st.integers(0, 2**64 - 1)).filter(lambda n: n != true_len))
    return replace(valid, weights=struct.pack("<Q", declared) + valid.weights[8:], must_fail=True)


@st.composite
def spliced(draw, valid: Files) -> Files:
    """Random bytes inserted or overwritten somewhere in one file."""
    which = draw(FILE)
    blob = getattr(valid, which)
    at = draw(st.integers(0, len(blob)))
    patch = draw(st.binary(min_size=1, max_size=16))
    keep = draw(st.sampled_from([0, len(patch)]))  # 0: insert, len: overwrite
    return replace(valid, **{which: blob[:at] + patch + blob[at + keep :]})


# --- generated and hand-written safetensors headers --------------------------------------


def safetensors_blob(header_text: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header_text)) + header_text + data


def valid_header(valid: Files) -> dict:
    (length,) = struct.unpack("<Q", valid.weights[:8])
    return json.loads(valid.weights[8 : 8 + length])


def tricky_names(valid_names: list[str]) -> st.SearchStrategy[str]:
    """Names near the real ones: path tricks, look-alikes, NUL, and plain random text."""
    near = st.builds(lambda a, b: a + b, st.sampled_from(valid_names), st.sampled_from(TRICKS))
    return st.one_of(st.sampled_from(TRICKS), near, st.text(max_size=40))


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
json_values = st.recursive(
    json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
dims = st.one_of(
    st.integers(0, 40), st.integers(2**31, 2**70), st.integers(-(2**64), -1),
    st.sampled_from([25_000_000_000, 2**63 - 1, 2**63, 2**64 - 1, 2**64]),
)


@st.composite
def generated_header(draw, valid: Files) -> Files:
    """A header of generated entries (random dtypes, shapes incl. huge ones, offsets) over zero data."""
    real = valid_header(valid)
    names = draw(st.one_of(st.just(sorted(real)), st.lists(tricky_names(sorted(real)) | st.sampled_from(sorted(real)),
                                                            max_size=6, unique=True)))
    consistent = draw(st.booleans())  # offsets computed from the shapes, so the header check passes
    header, cursor = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(DTYPE_NAMES) | st.text(max_size=4))
        real_shape = real.get(name, {}).get("shape", [1])
        shape = draw(st.one_of(st.just(real_shape), st.lists(dims, max_size=4), json_values))
        if consistent and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
            nbytes = math.prod(shape) * ALLOWED_DTYPES.get(dtype, 4)
            offsets = [cursor, cursor + nbytes]
            cursor += nbytes
        else:
            offsets = draw(st.one_of(st.lists(st.integers(-(2**64), 2**65), max_size=3), json_values))
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        header[name] = draw(st.one_of(st.just(entry), st.dictionaries(st.sampled_from(list(entry)), json_values)))
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    size = cursor if consistent and cursor <= 1 << 16 else draw(st.integers(0, 4096))
    return replace(valid, weights=safetensors_blob(json.dumps(header).encode(), bytes(size)))


RAW_HEADERS = [
    b"[" * 100_000 + b"]" * 100_000,  # deeper than any recursive parser's stack
    b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}',  # int() refuses > 4300 digits
    b'{"a":{"dtype":"F32","shape":[1e400],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[-Infinity],"data_offsets":[0,4]}}',
    b"{}", b"[]", b'"x"', b"null", b"1", b"", b"\xef\xbb\xbf{}", b"\xff\xfe{", b'{"a":1}trailing', b"{" * 8,
]


@st.composite
def raw_header(draw, valid: Files) -> Files:
    """Hand-written header texts no parser should choke on: nesting, huge ints, non-objects."""
    text = draw(st.sampled_from(RAW_HEADERS))
    return replace(valid, weights=safetensors_blob(text, draw(st.sampled_from([b"", bytes(4)]))), must_fail=True)


@st.composite
def duplicate_keys(draw, valid: Files) -> Files:
    """The real header with one tensor name written twice (same entry or another) in the JSON text."""
    real = valid_header(valid)
    (length,) = struct.unpack("<Q", valid.weights[:8])
    name = draw(st.sampled_from(sorted(real)))
    twin = draw(st.one_of(st.just(real[name]), st.fixed_dictionaries(
        {"dtype": st.sampled_from(DTYPE_NAMES), "shape": st.lists(dims, max_size=3),
         "data_offsets": st.lists(st.integers(0, 8192), min_size=2, max_size=2)})))
    entries = [json.dumps(k) + ":" + json.dumps(v) for k, v in real.items()]
    entries.insert(draw(st.integers(0, len(entries))), json.dumps(name) + ":" + json.dumps(twin))
    text = ("{" + ",".join(entries) + "}").encode()
    return replace(valid, weights=safetensors_blob(text, valid.weights[8 + length :]))


# --- tensor-level edits (re-saved with safetensors) ------------------------------------


def resave(valid: Files, tensors: dict[str, torch.Tensor], must_fail: bool) -> Files:
    return replace(valid, weights=save_safetensors_bytes(tensors), must_fail=must_fail)


@st.composite
def non_finite(draw, valid: Files) -> Files:
    tensors = load_safetensors_bytes(valid.weights)
    name = draw(st.sampled_from(sorted(tensors)))
    tensor = tensors[name].to(draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))).clone()
    tensor.view(-1)[draw(st.integers(0, tensor.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return resave(valid, tensors | {name: tensor}, must_fail=True)


@st.composite
def retyped(draw, valid: Files) -> Files:
    dtypes = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8,
              torch.bool, torch.float8_e4m3fn]
    tensors = load_safetensors_bytes(valid.weights)
    name, dtype = draw(st.sampled_from(sorted(tensors))), draw(st.sampled_from(dtypes))
    allowed = dtype in (torch.float16, torch.bfloat16)
    return resave(valid, tensors | {name: tensors[name].to(dtype)}, must_fail=not allowed)


@st.composite
def renamed(draw, valid: Files) -> Files:
    """A tensor dropped, renamed or added under a tricky name (never a bias: serving may omit a head's bias)."""
    tensors = load_safetensors_bytes(valid.weights)
    name = draw(st.sampled_from(sorted(name for name in tensors if not name.endswith(".bias"))))
    other = draw(tricky_names(sorted(tensors)).filter(lambda n: n not in tensors))
    action = draw(st.sampled_from(["drop", "rename", "add"]))
    edited = {k: v for k, v in tensors.items() if action == "add" or k != name}
    if action != "drop":
        edited[other] = tensors[name].clone()
    return resave(valid, edited, must_fail=True)


@st.composite
def reshaped(draw, valid: Files) -> Files:
    tensors = load_safetensors_bytes(valid.weights)
    name = draw(st.sampled_from(sorted(tensors)))
    tensor = tensors[name]
    shape = draw(st.sampled_from([(-1,), (1, -1), (-1, 1), tuple(reversed(tensor.shape)), (1, *tensor.shape)]))
    new = tensor.reshape(shape).contiguous()
    return resave(valid, tensors | {name: new}, must_fail=new.shape != tensor.shape)


# --- config mutations --------------------------------------------------------------------

RAW_LITERALS = [b"9" * 5000, b"1e999", b"-1", b"0", b"NaN", b"Infinity", b'"4"', b"4.0", b"4.5", b"true", b"null",
                b"[]", b"{}", b"[" * 10_000 + b"]" * 10_000, b'"\\ud800"', b'"\xff"']
REQUIRED_FIELDS = {"base_model", "target_layers"}


def config_paths(config: dict) -> list[tuple]:
    """Every place a value can be swapped: top-level fields, the backbone ref, list items."""
    paths: list[tuple] = [(key,) for key in config]
    paths += [("base_model", key) for key in config["base_model"]]
    paths += [(key, i) for key in ("target_layers", "head_modules", "labels") for i in range(len(config[key]))]
    return paths


def set_at(config: dict, path: tuple, value) -> dict:
    edited = copy.deepcopy(config)
    *parents, last = path
    node = edited
    for key in parents:
        node = node[key]
    node[last] = value
    return edited


@st.composite
def config_edits(draw, valid: Files) -> Files:
    """One field of the config set to a generated value (wrong types, unicode, odd literals), or dropped."""
    config = json.loads(valid.config)
    path = draw(st.sampled_from(config_paths(config)))
    kind = draw(st.sampled_from(["value", "text", "literal", "drop"]))
    if kind == "drop" and len(path) == 1:
        del config[path[0]]
        return replace(valid, config=json.dumps(config).encode(), must_fail=path[0] in REQUIRED_FIELDS)
    if kind == "literal":
        text = json.dumps(set_at(config, path, "@LITERAL@")).encode()
        return replace(valid, config=text.replace(b'"@LITERAL@"', draw(st.sampled_from(RAW_LITERALS))))
    value = draw(json_values if kind == "value" else tricky_names(config["target_layers"]))
    return replace(valid, config=json.dumps(set_at(config, path, value)).encode())


@st.composite
def config_unknown_field(draw, valid: Files) -> Files:
    config = json.loads(valid.config)
    field = draw(st.text(max_size=20).filter(lambda k: k not in config))
    return replace(valid, config=json.dumps(config | {field: draw(json_values)}).encode(), must_fail=True)


@st.composite
def config_garbage(draw, valid: Files) -> Files:
    return replace(valid, config=draw(st.binary(max_size=256)), must_fail=True)


# --- crafted adapters: names and shapes agree, only heads vs targets vary ---------------


@st.composite
def crafted(draw, bench: Bench) -> Files:
    """A well-formed file exactly matching what its own config asks of this backbone,
    with odd head modules: the backbone itself, a target layer, a parent of targets."""
    config = json.loads(bench.valid.config)
    targets = draw(st.lists(st.sampled_from(config["target_layers"]), min_size=1, max_size=3, unique=True))
    modules = [name for name, _ in bench.base.named_modules()]
    heads = draw(st.lists(st.sampled_from(["classifier", "", "bert.pooler", *(f"bert.{t}" for t in targets)])
                          | st.sampled_from(modules), min_size=1, max_size=2, unique=True))
    tensors = {k: v for k, v in bench.tensors.items() if any(k.startswith(t + ".dcft_") for t in targets)}
    for head in heads:
        tensors |= {f"{head}.{k}": v.clone() for k, v in bench.base.get_submodule(head).state_dict().items()}
    config |= {"target_layers": targets, "head_modules": heads}
    return Files(json.dumps(config).encode(), save_safetensors_bytes(tensors))


# --- bounded memory ----------------------------------------------------------------------


def _address_space() -> int:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmSize:\s+(\d+) kB", status.read())[1]) * 1024


@contextmanager
def bounded_memory(python_bytes: int = 50 << 20, native_headroom: int = GiB):
    """Fail if the block allocates over `python_bytes` of Python objects; on Linux also
    refuse (MemoryError / RuntimeError) any native reservation beyond `native_headroom`."""
    limit_as = os.path.exists("/proc/self/status")
    if limit_as:
        old = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (_address_space() + native_headroom, old[1]))
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
        assert peak < python_bytes, f"peak Python allocation {peak / 2**20:.1f} MiB"
    finally:
        tracemalloc.stop()
        if limit_as:
            resource.setrlimit(resource.RLIMIT_AS, old)


@st.composite
def huge_declared(draw, valid: Files) -> Files:
    """A header declaring one tensor of >= 1 GiB (up to ~1e30 bytes) with consistent offsets."""
    real = valid_header(valid)
    shape = draw(st.lists(st.integers(1, 2**40), min_size=1, max_size=4).filter(lambda s: math.prod(s) * 4 >= GiB))
    if draw(st.booleans()):
        shape.insert(draw(st.integers(0, len(shape))), 0)  # zero bytes, but a shape no tensor can take
    name = draw(st.sampled_from(sorted(real)))
    nbytes = math.prod(shape) * 4
    header = {name: {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}}
    return replace(valid, weights=safetensors_blob(json.dumps(header).encode(), bytes(draw(st.integers(0, 64)))),
                   must_fail=True)


# --- the targets -------------------------------------------------------------------------


def test_loader_survives_byte_mutations(bench, record_property):
    strategy = st.one_of(truncated(bench.valid), bit_flipped(bench.valid), wrong_header_length(bench.valid),
                         spliced(bench.valid))
    run_target("loader: byte mutations", strategy, lambda files: check_readers(bench, files), 200, record_property)


def test_loader_survives_generated_headers(bench, record_property):
    strategy = st.one_of(generated_header(bench.valid), raw_header(bench.valid), duplicate_keys(bench.valid))
    run_target("loader: safetensors headers", strategy, lambda files: check_readers(bench, files), 200, record_property)


def test_loader_survives_tensor_edits(bench, record_property):
    strategy = st.one_of(non_finite(bench.valid), retyped(bench.valid), renamed(bench.valid), reshaped(bench.valid))
    run_target("loader: tensor edits", strategy, lambda files: check_readers(bench, files), 150, record_property)


def test_loader_survives_config_edits(bench, record_property):
    strategy = st.one_of(config_edits(bench.valid), config_unknown_field(bench.valid), config_garbage(bench.valid))
    run_target("loader: config edits", strategy, lambda files: check_readers(bench, files), 200, record_property)


def test_loader_survives_crafted_heads(bench, record_property):
    run_target("loader: crafted heads", crafted(bench), lambda files: check_readers(bench, files), 60, record_property)


def test_huge_declared_shapes_allocate_nothing(bench, record_property):
    def check(files: Files) -> None:
        case_dir, model = bench.write(files), bench.take_model()
        with bounded_memory(), pytest.raises(AdapterFileError):
            load_adapter(model, case_dir)
        bench.give_back(model)

    run_target("loader: huge declared shapes", huge_declared(bench.valid), check, 50, record_property)


def test_an_empty_tensor_with_huge_dimensions_is_refused(bench):
    """Zero bytes of data pass the size check, but its strides would overflow (found by Hypothesis)."""
    header = {"x": {"dtype": "F32", "shape": [410604, 21170, 0, 70648, 1882872949], "data_offsets": [0, 0]}}
    case_dir = bench.write(replace(bench.valid, weights=safetensors_blob(json.dumps(header).encode(), b"")))
    model = bench.take_model()
    with pytest.raises(AdapterFileError, match="too large to index"):
        load_adapter(model, case_dir)
    bench.give_back(model)


def test_a_100_gb_weights_file_is_refused_unread(bench):
    """A sparse file really 100 GB long, its header declaring one 100 GB tensor."""
    header = {"x": {"dtype": "F32", "shape": [25_000_000_000], "data_offsets": [0, 100_000_000_000]}}
    blob = safetensors_blob(json.dumps(header).encode(), b"")
    case_dir = bench.write(replace(bench.valid, weights=blob))
    with open(case_dir / WEIGHTS_NAME, "r+b") as handle:
        handle.truncate(len(blob) + 100_000_000_000)
    model = bench.take_model()
    try:
        with bounded_memory(), pytest.raises(AdapterFileError, match="exceeds the limit"):
            load_adapter(model, case_dir)
    finally:
        (case_dir / WEIGHTS_NAME).unlink()
    bench.give_back(model)


# --- the hub: names, and what a publish may touch --------------------------------------

NAME_TRICKS = [
    "../x/y", "a/b/../../../etc", "/abs/x", "acme//task", "acme/task/", "acme/task@1", "acme/task@latest",
    "acme/task\x00", "ａｃｍｅ/ｔａｓｋ", "acme/tas\u0138", "acme/task\n", "acme/ta sk", "ACME/task", "acme/.task",
    "acme/" + "a" * 64, "acme/" + "a" * 65, "a" * 10_000, "acme\\task", "C:/task", "~/task", ".tmp-x/y", "blobs/x",
]
name_parts = st.one_of(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True), st.sampled_from(TRICKS),
                       st.text(max_size=70))
hub_names = st.one_of(
    st.builds("{}/{}".format, name_parts, name_parts), st.sampled_from(NAME_TRICKS), st.text(max_size=200)
)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (directories map to None) with its bytes."""
    found: dict[str, bytes | None] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            found[os.path.relpath(os.path.join(folder, name), root)] = Path(folder, name).read_bytes()
    return found


def temp_leftovers() -> set[str]:
    """The temp folders a publish makes; other dcft work (a fine-tuning job's Ray worker, say) may come
    and go in the same temp dir meanwhile, and is not this test's business."""
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith(("dcft-publish-", "dcft-check-"))}


@pytest.fixture
def sandbox(tmp_path, bench) -> tuple[Path, AdapterHub]:
    """A hub inside a sandbox folder that also holds a canary: nothing may appear outside hub/."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "canary").write_text("untouched")
    hub = AdapterHub(tmp_path / "hub", cache_dir=tmp_path / "hub" / ".cache")
    hub.publish(bench.valid_dir, "public/seed")
    return tmp_path, hub


def test_publish_accepts_only_safe_names(bench, sandbox, record_property):
    root, hub = sandbox
    leftovers = temp_leftovers()

    def check(name: str) -> None:
        before = tree(root)
        try:
            version = hub.publish(bench.valid_dir, name)
        except RegistryError:
            assert not SAFE_NAME.fullmatch(name), f"safe name {name!r} refused"
            assert tree(root) == before
            return
        assert SAFE_NAME.fullmatch(name) and version.name == name, f"unsafe name {name!r} accepted"
        added = set(tree(root)) - set(before)
        assert all(path.startswith(os.path.join("hub", "adapters", "")) for path in added), sorted(added)

    run_target("hub: publish names", hub_names, check, 200, record_property)
    assert temp_leftovers() == leftovers


def test_hub_reads_refuse_bad_refs_cleanly(sandbox, record_property):
    root, hub = sandbox
    refs = st.one_of(hub_names, st.builds("{}@{}".format, hub_names, st.text(max_size=12)), st.just("public/seed"))

    def check(ref: str) -> None:
        before = {path for path in tree(root) if not path.startswith(os.path.join("hub", ".cache"))}
        for read in (hub.resolve, hub.fetch, hub.versions, lambda r: hub.list(tenant=r.partition("/")[0])):
            with suppress(RegistryError):
                read(ref)
        after = {path for path in tree(root) if not path.startswith(os.path.join("hub", ".cache"))}
        assert after == before, "a read changed files outside the cache"

    run_target("hub: read refs", refs, check, 150, record_property)


def test_publish_of_mutated_files_is_all_or_nothing(bench, sandbox, record_property):
    root, hub = sandbox
    strategy = st.one_of(truncated(bench.valid), bit_flipped(bench.valid), generated_header(bench.valid),
                         non_finite(bench.valid), config_edits(bench.valid))

    def check(files: Files) -> None:
        case_dir = bench.write(files)
        before = tree(root)
        try:
            hub.publish(case_dir, "acme/fuzzed")
        except AdapterError:
            assert tree(root) == before, "a refused publish changed the hub"
            return
        assert not files.must_fail, "a file that must be rejected was published"

    run_target("hub: publish mutated files", strategy, check, 100, record_property)

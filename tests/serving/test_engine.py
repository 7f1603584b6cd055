"""The Ray-free engine: mixed-adapter batches equal each adapter run alone (merged)."""

import pytest
import torch

from adapters.errors import AdapterError
from adapters.injection import merge_adapter
from adapters.store.hub import AdapterHub
from adapters.store.loading import load_adapter
from backbones.loading import load_backbone, load_tokenizer
from benchmarks.fixtures import random_adapter, tiny_llama_dir
from serving.config import EngineConfig
from serving.engine import Engine
from serving.generation import generate
from serving.rows import GenerateRow, Sampling

TEXTS = ["a gripping, funny film", "dull and overlong", "superb acting", "the plot goes nowhere", "best of the year"]

F32 = "float32"  # the references are float32 models; on a GPU the engine's auto dtype is bfloat16


@pytest.fixture(scope="module")
def minilm_hub(tmp_path_factory, minilm_dir):
    root = tmp_path_factory.mktemp("minilm")
    hub = AdapterHub(str(root / "hub"))
    dirs = {}
    for i, labels in enumerate([("neg", "pos"), ("a", "b", "c"), ("x", "y")]):
        dirs[f"t{i}/task"] = random_adapter(minilm_dir, root / f"a{i}", "seq_cls", seed=i, labels=labels)
        hub.publish(dirs[f"t{i}/task"], f"t{i}/task")
    return hub, dirs


def merged_probs(model_dir, adapter_dir, texts):
    """Reference: one adapter alone, merged into a BertForSequenceClassification."""
    import json

    labels = json.loads((adapter_dir / "adapter_config.json").read_text())["labels"]
    model = load_backbone(model_dir, "seq_cls", len(labels))
    load_adapter(model, adapter_dir)
    merge_adapter(model)
    with torch.no_grad():
        encoded = load_tokenizer(model_dir)(texts, padding=True, return_tensors="pt")
        encoded = {k: v.to(model.device) for k, v in encoded.items()}
        return model(**encoded).logits.softmax(-1)


@pytest.mark.real
def test_mixed_batch_matches_each_adapter_alone_real_minilm(minilm_dir, minilm_hub):
    hub, dirs = minilm_hub
    engine = Engine(EngineConfig(model=str(minilm_dir), hub=hub.url, dtype=F32))
    names = list(dirs)
    rows = [engine.encode_classify(text, None, engine.resolve(names[i % 3])) for i, text in enumerate(TEXTS)]
    predictions = engine.classify(rows)
    for name in names:
        mine = [i for i in range(len(TEXTS)) if names[i % 3] == name]
        reference = merged_probs(minilm_dir, dirs[name], [TEXTS[i] for i in mine])
        for ref_row, i in zip(reference, mine, strict=True):
            got = torch.tensor(list(predictions[i].scores.values()), device=ref_row.device)
            torch.testing.assert_close(got, ref_row, rtol=1e-4, atol=1e-5)


@pytest.mark.real
def test_eviction_and_reload_keep_outputs_identical(minilm_dir, minilm_hub):
    hub, dirs = minilm_hub
    engine = Engine(EngineConfig(model=str(minilm_dir), hub=hub.url, dtype=F32, device_slots=1, host_capacity=1))
    keys = [engine.resolve(name) for name in dirs]
    first = [engine.classify([engine.encode_classify(TEXTS[0], None, key)])[0] for key in keys]
    again = [engine.classify([engine.encode_classify(TEXTS[0], None, key)])[0] for key in reversed(keys)][::-1]
    assert first == again
    stats = {
        s.labels["tier"]: s.value
        for s in engine.metrics.bank_evictions.collect()[0].samples
        if s.name.endswith("_total")
    }
    assert stats["device"] >= 4 and stats["host"] >= 4


@pytest.fixture(scope="module")
def llama_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    model_dir = tiny_llama_dir(root / "model")
    hub = AdapterHub(str(root / "hub"))
    dirs = {}
    for i in range(2):
        dirs[f"t{i}/lm"] = random_adapter(model_dir, root / f"a{i}", "causal_lm", seed=10 + i, kernel=4, scale=0.5)
        hub.publish(dirs[f"t{i}/lm"], f"t{i}/lm")
    return model_dir, hub, dirs


def test_generation_keeps_each_rows_adapter_every_step(llama_hub):
    model_dir, hub, dirs = llama_hub
    engine = Engine(EngineConfig(model=str(model_dir), hub=hub.url, dtype=F32, kernel_size=4))
    prompts = ["a gripping", "the plot", "one of the best"]
    refs = ["t0/lm", None, "t1/lm"]
    greedy = Sampling(max_tokens=8)
    keys = [engine.resolve(r) if r else None for r in refs]
    rows = [engine.encode_prompt(p, key, greedy) for key, p in zip(keys, prompts, strict=True)]
    mixed = engine.generate(rows)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "left"
    for ref, prompt, got in zip(refs, prompts, mixed, strict=True):
        alone = load_backbone(model_dir, "causal_lm")
        if ref:
            load_adapter(alone, dirs[ref])
            merge_adapter(alone)
        ids = tuple(tokenizer(prompt)["input_ids"])
        expected = generate(alone, tokenizer, [GenerateRow(None, ids, greedy)], engine.eos)[0]
        assert got.tokens == expected.tokens, ref
    assert len({tuple(g.tokens) for g in mixed}) == 3, "adapters must change the generations"


def test_sampling_is_seeded_and_stop_strings_cut(llama_hub):
    model_dir, hub, _ = llama_hub
    engine = Engine(EngineConfig(model=str(model_dir), hub=hub.url, dtype=F32, kernel_size=4))
    row = engine.encode_prompt("a gripping", engine.resolve("t0/lm"), Sampling(12, temperature=1.0, seed=7))
    a, b = engine.generate([row, row])
    assert a.tokens == b.tokens and a.finish_reason in ("stop", "length")
    greedy = engine.generate([engine.encode_prompt("a gripping", None, Sampling(12))])[0]
    assert len(greedy.tokens) == 12 and greedy.finish_reason == "length", "the bare tiny model never emits EOS here"
    stop = greedy.text[len(greedy.text) // 2:][:2]
    assert stop, greedy.text
    cut = engine.generate([engine.encode_prompt("a gripping", None, Sampling(12, stop=(stop,)))])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and greedy.text.startswith(cut.text)


def test_hot_swap_resolves_new_version_and_keeps_old_until_released(llama_hub, tmp_path):
    model_dir, hub, dirs = llama_hub
    engine = Engine(EngineConfig(model=str(model_dir), hub=hub.url, dtype=F32, kernel_size=4))
    old_key = engine.resolve("t0/lm")
    slots = engine.placement.acquire([old_key])  # a batch in flight holds v1
    new_dir = random_adapter(model_dir, tmp_path / "v2", "causal_lm", seed=99, kernel=4)
    version = hub.publish(new_dir, "t0/lm")
    changed = engine.reload()
    assert changed["t0/lm"][1] == version.version
    assert engine.resolve("t0/lm") != old_key
    assert engine.placement.is_on_device(old_key), "in-flight version must stay until released"
    engine.placement.release(slots)


@pytest.mark.real
def test_merged_replica_matches_mixed_and_swaps_exactly(minilm_dir, minilm_hub):
    hub, dirs = minilm_hub
    config = {"model": str(minilm_dir), "hub": hub.url, "dtype": F32}
    mixed = Engine(EngineConfig(**config))
    merged = Engine(EngineConfig(**config, mode="merged", merged_adapter="t0/task"))
    pristine = {k: v.clone() for k, v in Engine(EngineConfig(**config, mode="merged")).model.state_dict().items()}
    for name in ("t0/task", "t2/task", "t0/task"):  # swap and swap back: unmerge must be exact
        rows_mixed = [mixed.encode_classify(t, None, mixed.resolve(name)) for t in TEXTS]
        rows_merged = [merged.encode_classify(t, None, merged.resolve(name)) for t in TEXTS]
        for a, b in zip(mixed.classify(rows_mixed), merged.classify(rows_merged), strict=True):
            assert a.label == b.label
            torch.testing.assert_close(
                torch.tensor(list(a.scores.values())), torch.tensor(list(b.scores.values())), rtol=1e-4, atol=1e-5
            )
    merged.placement.unload_current()
    assert all(torch.equal(v, merged.model.state_dict()[k]) for k, v in pristine.items())
    with pytest.raises(AdapterError, match="one adapter per batch"):
        merged.classify([merged.encode_classify("a", None, merged.resolve("t0/task")),
                         merged.encode_classify("b", None, merged.resolve("t2/task"))])

"""CUDA graphs for classify: the bucket padding they rely on (any device), and graphs against eager (CUDA)."""

import pytest
import torch

from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_bert_dir
from serving.config import EngineConfig
from serving.engine import Engine, serving_dtype
from serving.graphs import MIN_TOKENS, bucket, pad_batch

TEXTS = ["a gripping film", "dull and overlong, the plot goes nowhere at all", "superb", "one of the best",
         "i walked out", "the acting is superb but the script is thin"]


def test_buckets_are_powers_of_two_within_the_cap():
    assert [bucket(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    assert bucket(3, MIN_TOKENS) == MIN_TOKENS and bucket(300, MIN_TOKENS, 256) == 256


def test_padding_to_a_bucket_keeps_each_real_rows_output(device, tmp_path):
    """What the graphs rely on: masked tokens and extra rows change nothing for the real rows."""
    from transformers import AutoModel, AutoTokenizer

    folder = tiny_bert_dir(tmp_path / "bert")
    model, tokenizer = AutoModel.from_pretrained(folder).to(device).eval(), AutoTokenizer.from_pretrained(folder)
    encoded = {k: v.to(device) for k, v in tokenizer(TEXTS[:3], padding=True, return_tensors="pt").items()}
    padded = pad_batch(encoded, rows=4, tokens=bucket(encoded["input_ids"].shape[1], MIN_TOKENS))
    with torch.no_grad():
        alone, in_bucket = model(**encoded).pooler_output, model(**padded).pooler_output
    torch.testing.assert_close(in_bucket[:3], alone, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(in_bucket).all()


def test_auto_dtype_is_bfloat16_on_cuda_only():
    assert serving_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert serving_dtype("auto", torch.device("cpu")) == torch.float32
    assert serving_dtype("float16", torch.device("cpu")) == torch.float16


@pytest.fixture(scope="module")
def bert_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    bert = tiny_bert_dir(root / "bert")
    hub = AdapterHub(str(root / "hub"))
    for i in range(3):
        hub.publish(random_adapter(bert, root / f"a{i}", "seq_cls", seed=i, kernel=4), f"t{i}/task")
    return bert, hub


def test_cuda_graphs_are_ignored_without_a_gpu(bert_hub):
    bert, hub = bert_hub
    engine = Engine(EngineConfig(model=str(bert), hub=hub.url, kernel_size=4, cuda_graphs=True, device="cpu"))
    assert engine.graphs is None
    key = engine.resolve("t0/task")
    assert engine.classify([engine.encode_classify(TEXTS[0], None, key)])[0].label in ("neg", "pos")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_classify_matches_eager_for_mixed_batches(bert_hub):
    bert, hub = bert_hub
    config = {"model": str(bert), "hub": hub.url, "kernel_size": 4, "dtype": "float32", "device": "cuda"}
    eager, graphed = Engine(EngineConfig(**config)), Engine(EngineConfig(**config, cuda_graphs=True))
    names = ["t0/task", "t1/task", "t2/task"]
    for count in (1, 3, 6, 5):  # new buckets, then one already captured
        rows = {engine: [engine.encode_classify(text, None, engine.resolve(names[i % 3]))
                         for i, text in enumerate(TEXTS[:count])] for engine in (eager, graphed)}
        want, got = eager.classify(rows[eager]), graphed.classify(rows[graphed])
        for a, b in zip(want, got, strict=True):
            assert a.label == b.label
            torch.testing.assert_close(torch.tensor(list(b.scores.values())), torch.tensor(list(a.scores.values())),
                                       rtol=1e-3, atol=1e-4)
    assert {rows for rows, _, _ in graphed.graphs.buckets} == {1, 4, 8}

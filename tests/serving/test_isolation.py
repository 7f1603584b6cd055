"""Tenants cannot hurt each other through a shared batch: generated mixed batches of good
and bad calls from different tenants go through `ModelService` (what one `@serve.batch`
hands a replica). Every good call answers as it does alone; every bad call gets its own
4xx error; a call that breaks the forward pass itself fails alone.

`pytest -s tests/serving/test_isolation.py` prints the counts.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.errors import AdapterError, RegistryError
from adapters.store.hub import AdapterHub
from adapters.store.names import AdapterRef
from benchmarks.fixtures import random_adapter, tiny_bert_dir, tiny_llama_dir
from serving.api.errors import status_for
from serving.calls import ClassifyCall, ClassifyResult, GenerateCall
from serving.config import EngineConfig
from serving.errors import BatchFailedError
from serving.rows import Sampling
from serving.service import ModelService

# Probabilities of two batch compositions agree to float32 rounding of a padded forward.
RTOL, ATOL = 1e-5, 1e-6
GOOD_TEXTS = ["a fine film", "dull", "the plot goes nowhere at all", "superb"]
BAD_INPUTS = {
    "unknown adapter": ("acme/nope", "fine"),
    # (a malformed name never reaches the model side: a call parses it when made, the edge's 400)
    "lone surrogate": ("globex/topic", "fine \ud800"),
    "over the context": ("globex/topic", "a " * 300),
    "wrong task for the route": None,  # filled per service below
}


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation")
    bert, llama = tiny_bert_dir(root / "bert"), tiny_llama_dir(root / "llama")
    hub = AdapterHub(str(root / "hub"))
    hub.publish(random_adapter(bert, root / "a", "seq_cls", seed=1, kernel=4), "acme/sentiment")
    hub.publish(random_adapter(bert, root / "b", "seq_cls", seed=2, kernel=4, labels=("x", "y", "z")), "globex/topic")
    hub.publish(random_adapter(bert, root / "c", "regression", seed=3, kernel=4), "public/score")
    lm_hub = AdapterHub(str(root / "lm-hub"))
    lm_hub.publish(random_adapter(llama, root / "d", "causal_lm", seed=4, kernel=4, scale=0.5), "acme/writer")
    lm_hub.publish(random_adapter(llama, root / "e", "causal_lm", seed=5, kernel=4, scale=0.5), "globex/writer")
    return (ModelService(EngineConfig(model=str(bert), hub=hub.url, kernel_size=4)),
            ModelService(EngineConfig(model=str(llama), hub=lm_hub.url, kernel_size=4)))


good_call = st.builds(
    lambda adapter, texts: ClassifyCall(adapter, tuple((t, None) for t in texts)),
    st.sampled_from(["acme/sentiment", "globex/topic", "public/score"]),
    st.lists(st.sampled_from(GOOD_TEXTS), min_size=1, max_size=3),
)
bad_kind = st.sampled_from([k for k in BAD_INPUTS if BAD_INPUTS[k]])


def bad_call(kind: str) -> ClassifyCall:
    adapter, text = BAD_INPUTS[kind]
    return ClassifyCall(adapter, ((text, None),))


def same_answer(mixed: ClassifyResult, alone: ClassifyResult) -> None:
    assert (mixed.adapter, mixed.version, mixed.prompt_tokens) == (alone.adapter, alone.version, alone.prompt_tokens)
    for got, want in zip(mixed.predictions, alone.predictions, strict=True):
        assert got.label == want.label
        if want.scores is not None:
            torch.testing.assert_close(torch.tensor(list(got.scores.values())),
                                       torch.tensor(list(want.scores.values())), rtol=RTOL, atol=ATOL)
        else:
            torch.testing.assert_close(torch.tensor(got.value), torch.tensor(want.value), rtol=RTOL, atol=ATOL)


def test_generated_mixed_batches_keep_every_good_call(services, record_property):
    service, _ = services
    counts = {"good answered": 0, "bad refused": 0, "batches": 0}

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(goods=st.lists(good_call, min_size=1, max_size=6), bads=st.lists(bad_kind, min_size=1, max_size=3),
           order=st.randoms(use_true_random=False))
    def check(goods, bads, order):
        calls = [(c, None) for c in goods] + [(bad_call(k), k) for k in bads]
        order.shuffle(calls)
        results = service.classify_many([c for c, _ in calls])
        counts["batches"] += 1
        for (call, kind), result in zip(calls, results, strict=True):
            if kind is None:
                same_answer(result, service.classify(call))
                counts["good answered"] += 1
            else:
                assert isinstance(result, AdapterError) and 400 <= status_for(result) < 500, (kind, result)
                assert "\ud800" not in str(result) and "a a a" not in str(result)  # no input echoed
                counts["bad refused"] += 1

    check()
    print(f"\nisolation (classify): {counts}, 0 server errors")
    record_property("isolation classify", str(counts))
    assert counts["good answered"] > 0 and counts["bad refused"] > 0


def test_a_call_that_breaks_the_forward_pass_fails_alone(services, monkeypatch):
    """Injected fault: the forward raises whenever one adapter's rows are in the batch.
    The batch is split until that call is alone; it gets a 500, the others their answers."""
    service, _ = services
    poisoned = service.engine.resolve("globex/topic")
    real_classify = service.engine.classify

    def classify(rows):
        if any(row.key == poisoned for row in rows):
            raise RuntimeError("device fault")
        return real_classify(rows)

    goods = [ClassifyCall("acme/sentiment", (("fine", None),)), ClassifyCall("public/score", (("dull", None),)),
             ClassifyCall("acme/sentiment", (("superb", None),))]
    alone = [service.classify(call) for call in goods]
    splits = service.engine.metrics.batch_splits._value.get()
    monkeypatch.setattr(service.engine, "classify", classify)
    results = service.classify_many([goods[0], ClassifyCall("globex/topic", (("fine", None),)), *goods[1:]])
    assert isinstance(results[1], BatchFailedError) and status_for(results[1]) == 500
    for got, want in zip([results[0], *results[2:]], alone, strict=True):
        same_answer(got, want)
    assert service.engine.metrics.batch_splits._value.get() == splits + 1


def test_mixed_generation_batches_keep_every_good_call(services, record_property):
    _, service = services
    greedy = Sampling(max_tokens=6)
    goods = [GenerateCall("acme/writer", ("a gripping",), sampling=greedy),
             GenerateCall(None, ("the plot",), sampling=greedy),
             GenerateCall("globex/writer", messages=(("user", "hi there"),), sampling=greedy)]
    bads = [GenerateCall("acme/nope", ("x",), sampling=greedy),
            GenerateCall("globex/writer", ("once \udfff",), sampling=greedy),
            GenerateCall("acme/writer", ("ぁ" * 200,), sampling=greedy)]
    alone = [service.generate(call) for call in goods]
    results = service.generate_many([bads[0], goods[0], bads[1], goods[1], bads[2], goods[2]])
    for got, want in zip(results[1::2], alone, strict=True):
        assert [g.tokens for g in got.generations] == [g.tokens for g in want.generations]
    codes = [status_for(err) for err in results[0::2]]
    assert codes == [404, 400, 400], codes
    print(f"\nisolation (generate): 3 good answered as alone, 3 bad refused with {codes}")
    record_property("isolation generate", f"good 3, bad {codes}")


def test_a_malformed_adapter_name_never_makes_a_call():
    """Names are parsed once, when the call is made (at the HTTP edge): a malformed one is refused
    there, naming what is wrong, and no model-side code ever sees it as text."""
    with pytest.raises(RegistryError, match="expected TENANT/TASK"):
        ClassifyCall("acme/../x", (("fine", None),))
    with pytest.raises(RegistryError, match="bad version"):
        GenerateCall("acme/writer@0", ("x",))
    assert ClassifyCall("acme/sentiment@2", (("fine", None),)).adapter == AdapterRef(tenant="acme", task="sentiment",
                                                                                       version=2)

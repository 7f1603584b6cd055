"""The decoder's model runner (serving/runner.py): the slotted cache, prefill and decode steps.

Reference: each row's whole sequence (prompt and the tokens fed so far) through the same serving model
alone, with no cache, its adapter's slot set; the runner's next-token logits must match it (fp32,
rtol = atol = 1e-4: the cached path attends over a masked, longer span and sums in another order).
Dispatch counts hold the step to the bare model's ops plus one op per wrapped layer at most.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.decode import runner_for
from benchmarks.dispatch import DispatchCounter
from benchmarks.fixtures import tiny_llama_dir
from benchmarks.forward import dcft_system, load_model
from serving.runner import ModelRunner

CPU = torch.device("cpu")
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [20, 21]]
SLOTS = [1, 0, 3, 2]  # row 1 runs the bare backbone


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """The serving model of a tiny Llama with three large random adapters written into slots 1-3."""
    model_dir = tiny_llama_dir(tmp_path_factory.mktemp("runner") / "llama")
    serving = dcft_system(model_dir, CPU, adapters=3, kernel=4)
    gen = torch.Generator().manual_seed(0)
    for bank in serving.placement.layers.values():
        for slot in (1, 2, 3):
            A, B, C = (torch.randn(bank.A.shape[1:], generator=gen), torch.randn(bank.B.shape[1:], generator=gen),
                       torch.randn(bank.C.shape[1:], generator=gen))
            bank.write_slot(slot, A * 0.3, B * 0.3, C * 0.3, 1.0)
    return model_dir, serving


def runner(serving, rows: int = 4, positions: int = 48, compile: bool = False) -> ModelRunner:
    return runner_for(serving.model, serving, CPU, torch.float32, rows, positions, "compile" if compile else "eager")


def alone(serving, ids: list[int], slot: int) -> torch.Tensor:
    """The last token's logits of `ids` through the serving model alone, no cache."""
    serving.placement.set_slot_index(torch.tensor([slot]) if slot else None)
    try:
        with torch.inference_mode():
            return serving.model(input_ids=torch.tensor([ids])).logits[0, -1]
    finally:
        serving.placement.set_slot_index(None)


def test_decode_steps_match_each_row_alone_with_mixed_adapters_and_an_idle_row(lm):
    _, serving = lm
    run = runner(serving)
    sequences = [list(p) for p in PROMPTS]
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(run.prefill(row, prompt, 0, SLOTS[row]), alone(serving, prompt, SLOTS[row]),
                                   **TOLERANCE)
    for step in range(5):
        idle = 2 if step in (1, 2) else None  # row 2 sits out two steps, then goes on where it was
        tokens = [(seq[-1] * 7 + step) % 90 + 4 for seq in sequences]
        positions = [None if row == idle else len(seq) for row, seq in enumerate(sequences)]
        logits = run.decode(tokens, positions, SLOTS)
        for row, seq in enumerate(sequences):
            if row == idle:
                continue
            seq.append(tokens[row])
            torch.testing.assert_close(logits[row], alone(serving, seq, SLOTS[row]), **TOLERANCE)


def test_adapters_change_the_logits(lm):
    """The adapters are large enough that the exactness test above would see a wrong slot."""
    _, serving = lm
    assert (alone(serving, PROMPTS[0], 1) - alone(serving, PROMPTS[0], 0)).abs().max() > 100 * TOLERANCE["atol"]


def test_a_prompt_prefilled_in_chunks_gives_the_whole_prefill(lm):
    _, serving = lm
    run, prompt = runner(serving), list(range(4, 24))
    whole = run.prefill(0, prompt, 0, 2)
    run.prefill(1, prompt[:8], 0, 2)
    run.prefill(1, prompt[8:16], 8, 2)
    torch.testing.assert_close(run.prefill(1, prompt[16:], 16, 2), whole, **TOLERANCE)
    run.copy_row(0, [2, 3], len(prompt))  # n choices: the other rows decode from the same prompt
    logits = run.decode([9, 9, 9, 9], [len(prompt)] * 4, [2, 2, 2, 2])
    for row in (1, 2, 3):
        torch.testing.assert_close(logits[row], logits[0], **TOLERANCE)


def counted_step(run: ModelRunner, slots: list[int]) -> DispatchCounter:
    for row, slot in enumerate(slots):
        run.prefill(row, PROMPTS[row], 0, slot)
    with DispatchCounter() as counter:
        run.decode([7] * len(slots), [len(p) for p in PROMPTS[: len(slots)]], slots)
    return counter


def test_a_step_dispatches_the_bare_model_ops_plus_at_most_two_per_wrapped_layer(lm):
    model_dir, serving = lm
    bare_model = load_model(model_dir, CPU)
    bare = counted_step(runner_for(bare_model, None, CPU, torch.float32, 4, 48), [0] * 4)
    every_row_bare = counted_step(runner(serving), [0] * 4)
    mixed = counted_step(runner(serving), SLOTS)
    wrapped = len(serving.shape.layer_dims)
    assert every_row_bare.total <= bare.total + 2, (every_row_bare.counts - bare.counts)
    assert mixed.counts["dcft.mixed_linear"] == wrapped
    assert (mixed.total - bare.total) / wrapped <= 2, (mixed.counts - bare.counts)


@pytest.mark.timeout(600)
def test_compiled_steps_match_eager_and_a_moving_position_never_recompiles(lm):
    _, serving = lm
    eager, compiled = runner(serving), runner(serving, compile=True)
    for run in (eager, compiled):
        for row, prompt in enumerate(PROMPTS):
            run.prefill(row, prompt, 0, SLOTS[row])
    for step in range(4):
        positions = [len(p) + step for p in PROMPTS]  # the rows' positions and the read length move each step
        # the first step compiles (symbolic rows and read length); none after it may
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            got = compiled.decode([7] * 4, positions, SLOTS)
        torch.testing.assert_close(got, eager.decode([7] * 4, positions, SLOTS), **TOLERANCE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_steps_replayed_from_cuda_graphs_match_eager(lm):
    model_dir, _ = lm
    cuda = torch.device("cuda")
    serving = dcft_system(model_dir, cuda, adapters=3, kernel=4)
    serving.placement.acquire(["a1", "a2", "a3"])
    runs = [runner_for(serving.model, serving, cuda, torch.float32, 4, 48, mode) for mode in ("eager", "graphs")]
    for run in runs:
        for row, prompt in enumerate(PROMPTS):
            run.prefill(row, prompt, 0, SLOTS[row])
    for step in range(3):
        positions = [len(p) + step for p in PROMPTS]
        for slots in (SLOTS, [0] * 4):  # a mixed step and an adapter-free one: two graphs
            eager, graphed = (run.decode([7] * 4, positions, slots) for run in runs)
            torch.testing.assert_close(graphed, eager, **TOLERANCE)
    assert {mixed for _, _, mixed in runs[1].graph_keys} == {True, False}

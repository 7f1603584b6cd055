"""Training step time on the real MiniLM: DCFT vs PEFT LoRA rank 1 vs a dense dW rebuilt every step.

    python -m benchmarks.train_step                        # 32 reviews x 64 tokens (~1 min on 2 CPU cores)
    python -m benchmarks.train_step --threads 1 --clock cpu  # the same, robust to a shared machine's other jobs
    python -m benchmarks.train_step --smoke                # a tiny random BERT, seconds (what the tests run)

One step = forward + loss + backward + AdamW step on one fixed batch of real rotten-tomatoes
reviews, with the same target layers (q, k, v, o, FFN in and out) and the classification head
training in every variant:
- dcft:       adapters.injection.inject_adapter, kernel 8: x @ dW^T in factored form, dW never built;
- peft-lora:  PEFT LoRA rank 1;
- dcft-dense: the authors' approach (loralib SVDLinear): the same A, B, C, but dW is built densely
              by the transposed convolution on every forward and added to W.
Variants are timed in interleaved rounds in one process; the median of rounds is reported.
Target: dcft no slower than peft-lora.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adapters.config import DCFTConfig
from adapters.injection import backbone_prefix, dcft_layers, default_head_modules, inject_adapter
from adapters.layer import DCFTLinear
from adapters.targets import find_target_layers
from backbones.loading import load_backbone, load_tokenizer
from backbones.shipped import MINILM, resolve_model_dir
from benchmarks.harness import (
    Variant,
    add_timing_options,
    time_variants,
    timing_device,
    torch_threads,
    where_time_goes,
)
from benchmarks.report import RESULTS_DIR, write_report

COLUMNS = ["system", "trainable_params", "ms_per_step", "tokens_per_s", "vs_lora"]


class DenseDeltaLinear(nn.Module):
    """The authors' forward: dW materialised from the layer's A, B, C every call, then one GEMM with W + dW."""

    def __init__(self, layer: DCFTLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.layer.base
        return F.linear(x, base.weight + self.layer.delta_weight(), base.bias)


def dcft_model(model_dir: Path, kernel: int, dense: bool, device: torch.device) -> nn.Module:
    model = load_backbone(model_dir, "seq_cls", 2, device)
    inject_adapter(model, DCFTConfig(kernel_size=kernel, init="paper"), default_head_modules(model, "seq_cls"))
    if dense:  # swap each factored layer for its dense twin, same parameters
        prefix = backbone_prefix(model)
        for name, layer in dcft_layers(model).items():
            parent, _, child = (prefix + name).rpartition(".")
            setattr(model.get_submodule(parent), child, DenseDeltaLinear(layer))
    return model.train()


def lora_model(model_dir: Path, device: torch.device) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = load_backbone(model_dir, "seq_cls", 2, device)
    targets = list(find_target_layers(model, ["all"]))
    heads = default_head_modules(model, "seq_cls")
    config = LoraConfig(r=1, lora_alpha=1, target_modules=targets, modules_to_save=heads)
    return get_peft_model(model, config).train()


def make_batch(model_dir: Path, examples: list[tuple[str, int]], rows: int, tokens: int, device) -> dict:
    """One review per row, padded or cut to `tokens`, as a classification batch is."""
    texts, labels = zip(*(examples * (rows // len(examples) + 1))[:rows], strict=True)
    encoded = load_tokenizer(model_dir)(list(texts), padding="max_length", truncation=True, max_length=tokens,
                                        return_tensors="pt")
    return {**encoded.to(device), "labels": torch.tensor(labels, device=device)}


def step_variant(name: str, model: nn.Module, batch: dict, lr: float) -> tuple[Variant, int]:
    """One training step as a timed variant, and the number of parameters it trains."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Variant(name, 0, step), sum(p.numel() for p in trainable)


def examples_for(smoke: bool) -> list[tuple[str, int]]:
    if smoke:
        from benchmarks.fixtures import CORPUS

        return [(text, i % 2) for i, text in enumerate(CORPUS)]
    from training.data import DataConfig, load_dataset

    return [(e.text, int(e.label)) for e in load_dataset(DataConfig()).train]


def run(model_dir: Path, args, device: torch.device) -> tuple[list[dict], str]:
    batch = make_batch(model_dir, examples_for(args.smoke), args.batch, args.tokens, device)
    built = [
        step_variant("dcft", dcft_model(model_dir, args.kernel, dense=False, device=device), batch, args.lr),
        step_variant("peft-lora", lora_model(model_dir, device), batch, args.lr),
        step_variant("dcft-dense", dcft_model(model_dir, args.kernel, dense=True, device=device), batch, args.lr),
    ]
    variants = [variant for variant, _ in built]
    times = time_variants(variants, args.rounds, device, args.clock)
    seconds = dict(zip((v.system for v in variants), times, strict=True))
    lora = seconds["peft-lora"]
    rows = [{
        "system": v.system, "trainable_params": params, "ms_per_step": seconds[v.system] * 1e3,
        "tokens_per_s": args.batch * args.tokens / seconds[v.system], "vs_lora": lora / seconds[v.system],
    } for v, params in built]
    slower = seconds["dcft"] > lora
    profile = where_time_goes(variants[1], variants[0], (lora, seconds["dcft"]), device) if slower else ""
    return rows, profile


def notes(args, rows: list[dict], profile: str, load: float) -> str:
    dcft = next(r for r in rows if r["system"] == "dcft")
    verdict = "met" if dcft["vs_lora"] >= 1.0 else "missed"
    text = (
        f"Batch {args.batch} reviews x {args.tokens} tokens, kernel {args.kernel}, AdamW lr {args.lr}, dropout on "
        f"(train mode), median of {args.rounds} interleaved rounds ({args.clock} clock); vs_lora = peft-lora step "
        f"time / this step time. 1-minute load average at start: {load:.1f}.\n\n"
        f"Target: dcft no slower than peft-lora: {dcft['vs_lora']:.3f}x ({verdict}).\n\n"
        f"Regenerate: `{args.command}`."
    )
    if profile:
        text += f"\n\n## Where the time goes\n\npeft-lora (left) vs dcft (right), {profile}"
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MINILM, help="encoder backbone (alias or folder)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--kernel", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    add_timing_options(parser)
    parser.add_argument("--smoke", action="store_true", help="a tiny random BERT and tiny sizes, for tests")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    args = parser.parse_args(argv)
    args.command = " ".join(["python -m benchmarks.train_step", *(sys.argv[1:] if argv is None else argv)])
    if args.smoke:
        args.batch, args.tokens, args.rounds = 4, 16, 1
        args.threads = args.threads or 1  # a tiny model gains nothing from threads and stalls on a busy machine
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, load = timing_device(args), os.getloadavg()[0]
    torch.manual_seed(0)
    with torch_threads(args.threads), tempfile.TemporaryDirectory() as tmp:
        if args.smoke:  # a random BERT (benchmarks/fixtures.py): no real weights needed
            from benchmarks.fixtures import tiny_bert_dir

            args.model = tiny_bert_dir(Path(tmp) / "bert")
        rows, profile = run(resolve_model_dir(args.model), args, device)
        name = "train_step_smoke" if args.smoke else "train_step"
        title = "Training step time: DCFT vs PEFT LoRA r1 vs dense dW per step"
        path = write_report(name, title, rows, COLUMNS, notes(args, rows, profile, load), args.out)
    for r in rows:
        print(f"{r['system']:11} {r['trainable_params']:8} params {r['ms_per_step']:9.1f} ms/step  "
              f"{r['vs_lora']:.3f}x peft-lora")
    print(f"report: {path}")


if __name__ == "__main__":
    main()

"""`dcft params`, `dcft inspect` and `dcft convert`: one adapter or backbone, no hub."""

from __future__ import annotations

import argparse

from cli.output import print_json


def _params(args: argparse.Namespace) -> None:
    from adapters.config import DCFTConfig
    from backbones.params import count, load_model_config

    model_config = load_model_config(args.source)
    rows = [
        count(model_config, DCFTConfig(kernel_size=s, stride=stride, targets=[t]), args.num_labels).model_dump()
        for t in args.targets
        for s in args.kernel_sizes
        for stride in (args.strides or [s])
        if stride <= s
    ]
    if args.json:
        return print_json(rows)
    print(
        f"{'targets':<10} {'kernel':>6} {'stride':>6} {'layers':>6} {'DCFT':>9} {'LoRA r1':>9} {'ratio':>6} {'head':>7}"
    )
    for r in rows:
        ratio = r["lora_rank1"] / r["dcft"]
        print(f"{r['targets']:<10} {r['kernel_size']:>6} {r['stride']:>6} {r['layers']:>6} {r['dcft']:>9,} "
              f"{r['lora_rank1']:>9,} {ratio:>5.1f}x {r['head']:>7,}")


def _inspect(args: argparse.Namespace) -> None:
    from adapters.store.summary import describe

    info = describe(args.path)
    if args.json:
        return print_json(info)
    config = info["config"]
    print(f"adapter   {info['path']}\ndigest    {info['digest']}")
    print(f"backbone  {config['base_model']['name']} ({config['base_model']['config_digest']})")
    print(f"task      {config['task_type']}  labels={config['labels']}")
    print(f"dcft      kernel={config['kernel_size']} stride={config['stride'] or config['kernel_size']} "
          f"rank={config['rank']} alpha={config['alpha']} init={config['init']}")
    print(f"params    dcft={info['parameters']['dcft']:,} head={info['parameters']['head']:,}  dtypes={info['dtypes']}")
    print(f"on disk   {info['bytes_on_disk']:,} bytes")
    for layer, shapes in info["layers"].items():
        print(f"  {layer:<55} A{tuple(shapes['A'])} B{tuple(shapes['B'])} C{tuple(shapes['C'])}")


def _convert(args: argparse.Namespace) -> None:
    from adapters.store.convert import convert_loralib_checkpoint
    from backbones.loading import backbone_ref
    from backbones.params import load_model_config, target_dims
    from backbones.shipped import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    model_config = load_model_config(model_dir)
    layers = list(target_dims(model_config, [".*"]))
    config = convert_loralib_checkpoint(
        args.checkpoint, args.out, backbone_ref(model_dir, model_config), layers, args.scaling, args.task
    )
    print(f"wrote {args.out}: {len(config.target_layers)} layers, kernel {config.kernel_size}")


def _export(args: argparse.Namespace) -> None:
    from adapters.store.export import export_peft_lora, recorded_backbone
    from adapters.store.files import read_adapter_config
    from backbones.shipped import resolve_model_dir

    source = args.model or recorded_backbone(read_adapter_config(args.adapter))
    summary = export_peft_lora(args.adapter, args.out, resolve_model_dir(source), base_model=source)
    if args.json:
        return print_json(summary.model_dump())
    print(f"wrote {summary.out_dir}: PEFT LoRA rank {summary.rank}, lora_alpha {summary.lora_alpha:g}, "
          f"{summary.layers} layers, head {summary.head_modules}, "
          f"{summary.lora_bytes:,} bytes on disk (DCFT: {summary.dcft_bytes:,})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="trainable DCFT parameters vs LoRA rank 1 for a backbone")
    p.add_argument("source", help="model folder, or its config.json")
    p.add_argument("--kernel-sizes", type=int, nargs="+", default=[2, 4, 8, 12])
    p.add_argument("--strides", type=int, nargs="+", help="default: stride = kernel")
    p.add_argument("--targets", nargs="+", default=["all", "attention", "qv"])
    p.add_argument("--num-labels", type=int, default=2, help="size of the (separately counted) head")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_params)

    p = sub.add_parser("inspect", help="print an adapter's config, digest, size and layer shapes")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_inspect)

    p = sub.add_parser("convert", help="convert an authors' loralib DCFT checkpoint (.safetensors)")
    p.add_argument("checkpoint")
    p.add_argument("--model", required=True, help="backbone folder or alias (minilm, smollm2)")
    p.add_argument("--out", required=True)
    p.add_argument("--scaling", type=float, default=1.0, help="their lora_alpha / r")
    p.add_argument("--task", default="seq_cls", choices=["seq_cls", "regression", "causal_lm"])
    p.set_defaults(handler=_convert)

    p = sub.add_parser("export", help="write an adapter as an exact PEFT LoRA folder (rank k*s) for LoRA servers")
    p.add_argument("adapter")
    p.add_argument("--format", required=True, choices=["peft-lora"])
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="backbone folder or alias; default: the one the adapter records")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_export)



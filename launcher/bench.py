"""``msmoe bench layer`` and ``msmoe bench ep``: parse, then call bench/layer.py and bench/ep.py."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from bench import ep, layer


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layer", help="MoE layer fwd+bwd vs dense FFN, DeepSpeed MoE and fairscale at equal FLOPs",
                       description=layer.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(layer.SHAPES), default="small",
                   help="preset B,H,W,C,F,E (small: 8,32,32,128,256,8; thesis: 2,80,80,256,512,8; "
                        "gpu: 16,80,80,512,2048,16)")
    for name in layer.PRESET_FIELDS:
        p.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    p.add_argument("--choice", choices=["token", "expert"], default="token",
                   help="our layers' router.choice (expert: every expert takes C patches)")
    p.add_argument("--compile", action="store_true",
                   help="also time our layers under torch.compile(fullgraph=True) (needs --choice expert or "
                        "--capacity-factor: a static plan)")
    p.add_argument("--impl", choices=["auto", "grouped_mm", "bmm", "fused"], default="auto",
                   help="our expert matmul implementation")
    p.add_argument("--all-impls", action="store_true", help="time our layers with both grouped_mm and bmm")
    p.add_argument("--skip", default="", help="comma list of peers to leave out: deepspeed,fairscale")
    p.add_argument("--fairscale-group", type=int, default=2048, help="tokens per fairscale MOELayer call")
    p.add_argument("--deepspeed-group", type=int, default=0,
                   help="tokens per DeepSpeed MoE call (0: all in one; its gating memory grows with tokens^2: "
                        "use 16384 at --shape gpu)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--experts-sweep", default=None, metavar="E1,E2,...",
                   help="time each expert count at the same active FLOPs and print one table (ours, DeepSpeed's, "
                        "dense); with --json the sweep goes there (msmoe report --layer-sweep adds it to the report)")
    p.set_defaults(func=run_layer)

    e = sub.add_parser("ep", help="expert-parallel step time and all-to-all bytes at several EP sizes",
                       description=ep.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--nproc", type=int, default=2)
    e.add_argument("--ep-sizes", default="1,2")
    e.add_argument("--json", default=None)
    add_ep_shape(e)
    e.set_defaults(func=run_ep)


def add_ep_shape(p: argparse.ArgumentParser) -> None:
    """The EP benchmark's shape as options (shared with the worker's entry point, launcher/bench_ep.py)."""
    for name, value in asdict(ep.EpShape()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)


def ep_shape(args: argparse.Namespace) -> ep.EpShape:
    return ep.EpShape(**{name: getattr(args, name) for name in asdict(ep.EpShape())})


def run_layer(args: argparse.Namespace) -> int:
    from launcher import allocator

    if args.compile and args.choice == "token" and args.capacity_factor is None:
        print("msmoe bench layer: --compile needs a static plan: add --choice expert or --capacity-factor F "
              "(dropless token choice has a data-dependent row count, which a whole-graph compile cannot take)",
              file=sys.stderr)
        return 2

    spec = layer.LayerBenchSpec.preset(
        args.shape, **{name: getattr(args, name) for name in layer.PRESET_FIELDS}, top_k=args.top_k,
        patch=args.patch, capacity_factor=args.capacity_factor, choice=args.choice, compile=args.compile,
        impl=args.impl, all_impls=args.all_impls,
        skip=tuple(s for s in args.skip.split(",") if s), fairscale_group=args.fairscale_group,
        deepspeed_group=args.deepspeed_group, repeats=args.repeats, warmup=args.warmup, dtype=args.dtype,
        device=args.device)
    if args.experts_sweep:
        sweep = layer.run_experts_sweep(spec, [int(e) for e in args.experts_sweep.split(",") if e])
        print("\n".join(layer.sweep_table(spec, sweep)))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": {"shape": args.shape, **asdict(spec)}, "sweep": sweep}, fh, indent=2)
        return 0
    rows, env = layer.run_layer_bench(spec)
    env["allocator"] = allocator.describe()
    layer.print_rows(spec, rows, env)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": {"shape": args.shape, **asdict(spec)}, "env": env, "rows": [asdict(r) for r in rows]},
                      fh, indent=2)
    return 0


def run_ep(args: argparse.Namespace) -> int:
    shape = ep_shape(args)
    try:
        results = ep.run_sweep(shape, args.nproc, [int(s) for s in args.ep_sizes.split(",")])
    except ep.BenchError as exc:
        print(exc, file=sys.stderr)
        return exc.returncode
    ep.print_results(shape, args.nproc, results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0

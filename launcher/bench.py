"""``msmoe bench layer``: PatchMoE forward+backward time beside a dense FFN of equal active FLOPs.

Legend: B batch, H/W map, C channels, F expert hidden, E experts, K top-k, P patch side.

Every point of the map passes through K experts of hidden width F, so the dense baseline is
one FFN of hidden width K*F: both do 2 * 2*C*(K*F) multiply-adds per point, forward. The
router adds 2*C*E per patch (per point for token routing), which the table also lists.

  msmoe bench layer                       # default shape, CPU
  msmoe bench layer --dim 256 --experts 16 --repeats 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from moe import ExpertConfig, PatchMoE, PatchMoEConfig, RouterConfig


@dataclass(frozen=True)
class BenchRow:
    name: str
    ms_median: float
    ms_min: float
    points_per_s: float
    gflop_per_step: float  # forward+backward (3x forward), expert/FFN matmuls only
    router_units: int
    ratio_to_dense: float


def _time_fwd_bwd(module: nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> list[float]:
    grad = torch.randn_like(x)
    times = []
    for i in range(warmup + repeats):
        xi = x.detach().requires_grad_()
        t0 = time.perf_counter()
        out = module(xi)
        y = out.out if hasattr(out, "out") else out
        (y * grad).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        module.zero_grad(set_to_none=True)
    return times


def run_layer_bench(args: argparse.Namespace) -> list[BenchRow]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    b, h, w, c, f, e, k = args.batch, args.height, args.width, args.dim, args.hidden, args.experts, args.top_k
    x = torch.randn(b, h, w, c, device=device, dtype=dtype)
    points = b * h * w
    gflop = 3 * points * 2 * (2 * c * k * f) / 1e9

    dense = nn.Sequential(nn.Linear(c, k * f), nn.GELU(), nn.Linear(k * f, c)).to(device, dtype)
    candidates: list[tuple[str, nn.Module, int]] = [("dense FFN (hidden K*F)", dense, 0)]
    for impl in ("grouped_mm", "bmm"):
        for patch in (args.patch, 1):
            cfg = PatchMoEConfig(
                dim=c, patch_size=patch,
                router=RouterConfig(num_experts=e, top_k=k),
                expert=ExpertConfig(kind="ffn", hidden_dim=f, impl=impl),
                capacity_factor=args.capacity_factor,
            )
            layer = PatchMoE(cfg).to(device, dtype)
            units = b * -(-h // patch) * -(-w // patch)
            label = f"PatchMoE P={patch} ({impl})" if patch > 1 else f"TokenMoE P=1 ({impl})"
            candidates.append((label, layer, units))

    rows: list[BenchRow] = []
    dense_ms = None
    for name, module, units in candidates:
        try:
            t = _time_fwd_bwd(module, x, args.repeats, args.warmup)
        except (RuntimeError, ValueError) as exc:  # e.g. grouped_mm unsupported on this device/dtype
            print(f"  skipped {name}: {exc}")
            continue
        med = statistics.median(t)
        dense_ms = dense_ms or med
        rows.append(BenchRow(name, med, min(t), points / (med / 1e3), gflop, units, med / dense_ms))
    return rows


def print_rows(args: argparse.Namespace, rows: list[BenchRow]) -> None:
    print(
        f"layer bench: B={args.batch} H={args.height} W={args.width} C={args.dim} F={args.hidden} "
        f"E={args.experts} K={args.top_k} P={args.patch} dtype={args.dtype} device={args.device} "
        f"threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    print(f"{'':28s} {'median ms':>10s} {'min ms':>8s} {'points/s':>12s} {'GFLOP':>7s} {'routed units':>13s} {'x dense':>8s}")
    for r in rows:
        print(
            f"{r.name:28s} {r.ms_median:10.2f} {r.ms_min:8.2f} {r.points_per_s:12.0f} "
            f"{r.gflop_per_step:7.2f} {r.router_units:13d} {r.ratio_to_dense:8.2f}"
        )


def add_layer_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layer", help="PatchMoE fwd+bwd vs a dense FFN of equal active FLOPs")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256, help="expert hidden width F")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=_main_layer)


def _main_layer(args: argparse.Namespace) -> int:
    rows = run_layer_bench(args)
    print_rows(args, rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"},
                       "rows": [asdict(r) for r in rows]}, fh, indent=2)
    return 0

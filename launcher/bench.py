"""``msmoe bench layer``: one MoE layer, forward + backward, against its peers at equal active FLOPs.

Legend: B batch, H/W map, C channels, F expert hidden, E experts, K top-k, P patch side.

Every point of the map passes through K experts of hidden width F, so the dense baseline is
one FFN of hidden width K*F: all contenders do 2 * 2*C*(K*F) multiply-adds per point, forward.
Contenders (all in one run, timed in alternation, one step of each per round):

  dense FFN (hidden K*F)     the practical limit
  PatchMoE P=P               ours, one routing decision per P x P patch
  TokenMoE P=1               ours, one routing decision per point
  DeepSpeed MoE (top-2)      deepspeed.moe.layer.MoE, drop_tokens=False (K=2 only)
  fairscale MOELayer Top2    fairscale.nn.MOELayer + Top2Gate, in token groups (K=2 only)

The router adds 2*C*E multiply-adds per routed unit and its metadata (expert id + weight) is
12 bytes per unit and choice: patch routing divides both by P*P; the table lists them.

  msmoe bench layer                            # B=8 32x32 C=128, CPU
  msmoe bench layer --shape thesis             # the thesis map [B, 80, 80, 256] with 8x8 patches
  msmoe bench layer --device cuda --dtype bf16 --shape thesis --json out.json   # + TFLOP/s, % of GEMM peak
  msmoe bench layer --device cuda --dtype bf16 --shape gpu --skip fairscale --deepspeed-group 16384   # fills an H100
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from moe import ExpertConfig, PatchMoE, PatchMoEConfig, RouterConfig

SHAPES = {  # preset: (batch, height, width, dim, hidden, experts)
    "small": (8, 32, 32, 128, 256, 8),
    "thesis": (2, 80, 80, 256, 512, 8),
    # fills one H100: 102,400 points, dense hidden K*F = 4096: 3 x 102400 x 2 x 2 x 512 x 4096 = 2.6 TFLOP per step
    "gpu": (16, 80, 80, 512, 2048, 16),
}
PRESET_FIELDS = ("batch", "height", "width", "dim", "hidden", "experts")


@dataclass(frozen=True)
class BenchRow:
    name: str
    ms_median: float
    ms_min: float
    points_per_s: float
    gflop_per_step: float  # forward+backward (3x forward), expert/FFN matmuls only
    router_units: int
    router_mflop: float  # forward gate matmul
    metadata_bytes: int  # expert id (int64) + weight (fp32) per routed unit and choice
    ratio_to_dense: float  # median over rounds of (this step's time / the dense step's time, same round)
    ratio_to_deepspeed: float | None  # the same against DeepSpeed's layer
    page_faults_per_step: float  # minor page faults of the process per step (mean over the rounds)
    ms_rounds: list[float]  # every timed step, round by round
    tflops: float  # achieved on the expert/FFN matmuls
    fraction_of_gemm_peak: float | None  # CUDA only


def _minor_faults() -> int:
    try:
        import resource
    except ImportError:  # not Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    xi = x.detach().requires_grad_()
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    out = module(xi)
    y = out.out if hasattr(out, "out") else out
    (y * grad).sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    ms = (time.perf_counter() - t0) * 1e3
    module.zero_grad(set_to_none=True)
    return ms


def _contenders(args, c: int, f: int, e: int, k: int, device, dtype) -> list[tuple[str, nn.Module, int]]:
    b, h, w = args.batch, args.height, args.width
    dense = nn.Sequential(nn.Linear(c, k * f), nn.GELU(), nn.Linear(k * f, c)).to(device, dtype)
    out: list[tuple[str, nn.Module, int]] = [("dense FFN (hidden K*F)", dense, 0)]
    impls = ("grouped_mm", "bmm", "fused") if args.all_impls else (args.impl,)
    for impl in impls:
        for patch in (args.patch, 1):
            cfg = PatchMoEConfig(dim=c, patch_size=patch, router=RouterConfig(num_experts=e, top_k=k),
                                 expert=ExpertConfig(kind="ffn", hidden_dim=f, impl=impl),
                                 capacity_factor=args.capacity_factor)
            units = b * -(-h // patch) * -(-w // patch)
            label = f"PatchMoE P={patch}" if patch > 1 else "TokenMoE P=1"
            out.append((label + (f" ({impl})" if args.all_impls else ""), PatchMoE(cfg).to(device, dtype), units))
    if k == 2 and "deepspeed" not in args.skip:
        from launcher.bench_peers import DeepSpeedMoE, single_rank_group

        single_rank_group(device)
        groups = f" (groups of {args.deepspeed_group})" if args.deepspeed_group else ""
        out.append((f"DeepSpeed MoE (top-2){groups}", DeepSpeedMoE(c, f, e, group_tokens=args.deepspeed_group)
                    .to(device, dtype), b * h * w))
    if k == 2 and "fairscale" not in args.skip:
        from launcher.bench_peers import FairscaleMoE, single_rank_group

        single_rank_group(device)
        out.append((f"fairscale MOELayer Top2 (groups of {args.fairscale_group})",
                    FairscaleMoE(c, f, e, args.fairscale_group).to(device, dtype), b * h * w))
    return out


def run_layer_bench(args: argparse.Namespace) -> tuple[list[BenchRow], dict]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    b, h, w, c, f, e, k = args.batch, args.height, args.width, args.dim, args.hidden, args.experts, args.top_k
    x = torch.randn(b, h, w, c, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    points = b * h * w
    gflop = 3 * points * 2 * (2 * c * k * f) / 1e9
    candidates = _contenders(args, c, f, e, k, device, dtype)

    live, times, faults = [], {}, {}
    for name, module, units in candidates:  # warm-up, and drop what cannot run here
        try:
            for _ in range(args.warmup):
                _step(module, x, grad)
        except (RuntimeError, ValueError, AssertionError) as exc:  # e.g. grouped_mm unsupported on this device
            print(f"  skipped {name}: {str(exc).splitlines()[0][:160]}")
            continue
        live.append((name, module, units))
        times[name] = []
        faults[name] = 0
    for _ in range(args.repeats):  # alternate: one step of each contender per round
        for name, module, _units in live:
            f0 = _minor_faults()
            times[name].append(_step(module, x, grad))
            faults[name] += _minor_faults() - f0

    peak = None
    if device.type == "cuda":
        from launcher.bench_peers import dense_gemm_peak_tflops

        peak = dense_gemm_peak_tflops(device, dtype)
    med = {name: statistics.median(t) for name, t in times.items()}
    dense_t = times[live[0][0]]
    ds_t = next((t for n, t in times.items() if n.startswith("DeepSpeed")), None)

    def paired(t: list[float], ref: list[float]) -> float:  # robust to the machine's drift
        return statistics.median(a / b for a, b in zip(t, ref))
    rows = []
    for name, _module, units in live:
        m = med[name]
        tflops = gflop / m  # GFLOP / ms = TFLOP/s
        rows.append(BenchRow(
            name=name, ms_median=m, ms_min=min(times[name]), points_per_s=points / (m / 1e3), gflop_per_step=gflop,
            router_units=units, router_mflop=2 * c * e * units / 1e6, metadata_bytes=12 * k * units,
            ratio_to_dense=paired(times[name], dense_t),
            ratio_to_deepspeed=paired(times[name], ds_t) if ds_t else None,
            page_faults_per_step=faults[name] / args.repeats, ms_rounds=list(times[name]), tflops=tflops,
            fraction_of_gemm_peak=(tflops / peak) if peak else None))
    from launcher import allocator

    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "allocator": allocator.describe(),
           "cpu": platform.processor() or platform.machine(), "gemm_peak_tflops": peak,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    return rows, env


def print_rows(args: argparse.Namespace, rows: list[BenchRow], env: dict) -> None:
    print(f"layer bench: B={args.batch} H={args.height} W={args.width} C={args.dim} F={args.hidden} "
          f"E={args.experts} K={args.top_k} P={args.patch} dtype={args.dtype} device={env['device']} "
          f"threads={env['threads']} rounds={args.repeats} (contenders alternate)")
    print(f"host allocator: {env['allocator']}")
    cuda = env["gemm_peak_tflops"] is not None
    head = (f"{'':44s} {'median ms':>10s} {'min ms':>8s} {'points/s':>11s} {'x dense':>8s} {'x DS':>6s} "
            f"{'routed units':>12s} {'router MFLOP':>12s} {'meta KiB':>9s} {'faults/step':>11s}")
    print(head + (f" {'TFLOP/s':>8s} {'% peak':>7s}" if cuda else ""))
    for r in rows:
        ds = f"{r.ratio_to_deepspeed:6.2f}" if r.ratio_to_deepspeed is not None else f"{'-':>6s}"
        line = (f"{r.name:44s} {r.ms_median:10.2f} {r.ms_min:8.2f} {r.points_per_s:11.0f} {r.ratio_to_dense:8.2f} "
                f"{ds} {r.router_units:12d} {r.router_mflop:12.2f} {r.metadata_bytes / 1024:9.1f} "
                f"{r.page_faults_per_step:11.0f}")
        if cuda:
            line += f" {r.tflops:8.1f} {100 * r.fraction_of_gemm_peak:6.1f}%"
        print(line)
    if cuda:
        print(f"dense GEMM peak measured: {env['gemm_peak_tflops']:.1f} TFLOP/s ({args.dtype})")
    print("x dense / x DS: median over rounds of the time relative to the dense FFN / DeepSpeed's layer "
          "in the same round (lower is faster; DS throughput / ours = x DS); faults/step: minor page faults; "
          "GFLOP per step (fwd+bwd, expert matmuls): " + f"{rows[0].gflop_per_step:.2f}")


def add_layer_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layer", help="MoE layer fwd+bwd vs dense FFN, DeepSpeed MoE and fairscale at equal FLOPs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small",
                   help="preset B,H,W,C,F,E (small: 8,32,32,128,256,8; thesis: 2,80,80,256,512,8; "
                        "gpu: 16,80,80,512,2048,16)")
    for name in PRESET_FIELDS:
        p.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=_main_layer)


def _main_layer(args: argparse.Namespace) -> int:
    preset = SHAPES[args.shape]
    for name, value in zip(PRESET_FIELDS, preset):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.skip = [s for s in args.skip.split(",") if s]
    rows, env = run_layer_bench(args)
    print_rows(args, rows, env)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"}, "env": env,
                       "rows": [asdict(r) for r in rows]}, fh, indent=2)
    return 0

"""The layer benchmark (``msmoe bench layer``; its command line is launcher/bench.py): one MoE
layer, forward + backward, against its peers at equal active FLOPs.

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
  msmoe bench layer --experts-sweep 8,32,128,512 --skip fairscale --json sweep.json   # cost vs expert count
  msmoe bench layer --choice expert --compile   # + our layer under torch.compile(fullgraph=True), vs eager

``--choice expert`` times expert-choice routing (every expert takes C patches); ``--compile`` adds
each of our layers compiled whole (a static plan is needed: expert choice or a capacity factor);
the line under the table gives compiled / eager, paired by round.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from dataclasses import dataclass, field

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
class LayerBenchSpec:
    """What to time: the shape (legend above), our layer's settings, the peers and the rounds."""

    batch: int = SHAPES["small"][0]
    height: int = SHAPES["small"][1]
    width: int = SHAPES["small"][2]
    dim: int = SHAPES["small"][3]
    hidden: int = SHAPES["small"][4]
    experts: int = SHAPES["small"][5]
    top_k: int = 2
    patch: int = 8
    capacity_factor: float | None = None  # None: dropless
    choice: str = "token"  # router.choice of our layers: "token" | "expert"
    compile: bool = False  # also time our layers under torch.compile(fullgraph=True)
    impl: str = "auto"  # our expert matmul implementation
    all_impls: bool = False  # time our layers with every implementation
    skip: tuple[str, ...] = ()  # peers left out: "deepspeed", "fairscale"
    fairscale_group: int = 2048  # tokens per fairscale MOELayer call
    deepspeed_group: int = 0  # tokens per DeepSpeed MoE call (0: all in one)
    repeats: int = 10  # timed rounds
    warmup: int = 2
    dtype: str = "fp32"
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")

    @classmethod
    def preset(cls, shape: str, **overrides) -> "LayerBenchSpec":
        """A preset shape (``SHAPES``) with the given fields replaced (None: keep the preset's)."""
        base = dict(zip(PRESET_FIELDS, SHAPES[shape]))
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


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


def _contenders(spec: LayerBenchSpec, c: int, f: int, e: int, k: int, device, dtype) -> list[tuple[str, nn.Module, int]]:
    b, h, w = spec.batch, spec.height, spec.width
    dense = nn.Sequential(nn.Linear(c, k * f), nn.GELU(), nn.Linear(k * f, c)).to(device, dtype)
    out: list[tuple[str, nn.Module, int]] = [("dense FFN (hidden K*F)", dense, 0)]
    impls = ("grouped_mm", "bmm", "fused") if spec.all_impls else (spec.impl,)
    for impl in impls:
        for patch in (spec.patch, 1):
            router = RouterConfig(num_experts=e, top_k=k, choice=spec.choice)
            cfg = PatchMoEConfig(dim=c, patch_size=patch, router=router, capacity_factor=spec.capacity_factor,
                                 expert=ExpertConfig(kind="ffn", hidden_dim=f, impl=impl))
            units = b * -(-h // patch) * -(-w // patch)
            label = f"PatchMoE P={patch}" if patch > 1 else "TokenMoE P=1"
            label += " EC" if spec.choice == "expert" else ""
            label += f" ({impl})" if spec.all_impls else ""
            ours = PatchMoE(cfg).to(device, dtype)
            out.append((label, ours, units))
            if spec.compile:
                out.append((label + " compiled", torch.compile(ours, fullgraph=True), units))
    if k == 2 and "deepspeed" not in spec.skip:
        from bench.peers import DeepSpeedMoE, single_rank_group

        single_rank_group(device)
        groups = f" (groups of {spec.deepspeed_group})" if spec.deepspeed_group else ""
        out.append((f"DeepSpeed MoE (top-2){groups}", DeepSpeedMoE(c, f, e, group_tokens=spec.deepspeed_group)
                    .to(device, dtype), b * h * w))
    if k == 2 and "fairscale" not in spec.skip:
        from bench.peers import FairscaleMoE, single_rank_group

        single_rank_group(device)
        out.append((f"fairscale MOELayer Top2 (groups of {spec.fairscale_group})",
                    FairscaleMoE(c, f, e, spec.fairscale_group).to(device, dtype), b * h * w))
    return out


def run_layer_bench(spec: LayerBenchSpec) -> tuple[list[BenchRow], dict]:
    torch.manual_seed(0)
    device = torch.device(spec.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec.dtype]
    b, h, w, c, f, e, k = spec.batch, spec.height, spec.width, spec.dim, spec.hidden, spec.experts, spec.top_k
    x = torch.randn(b, h, w, c, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    points = b * h * w
    gflop = 3 * points * 2 * (2 * c * k * f) / 1e9
    candidates = _contenders(spec, c, f, e, k, device, dtype)

    live, times, faults = [], {}, {}
    for name, module, units in candidates:  # warm-up, and drop what cannot run here
        try:
            for _ in range(spec.warmup):
                _step(module, x, grad)
        except (RuntimeError, ValueError, AssertionError) as exc:  # e.g. grouped_mm unsupported on this device
            print(f"  skipped {name}: {str(exc).splitlines()[0][:160]}")
            continue
        live.append((name, module, units))
        times[name] = []
        faults[name] = 0
    for _ in range(spec.repeats):  # alternate: one step of each contender per round
        for name, module, _units in live:
            f0 = _minor_faults()
            times[name].append(_step(module, x, grad))
            faults[name] += _minor_faults() - f0

    peak = None
    if device.type == "cuda":
        from bench.peers import dense_gemm_peak_tflops

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
            page_faults_per_step=faults[name] / spec.repeats, ms_rounds=list(times[name]), tflops=tflops,
            fraction_of_gemm_peak=(tflops / peak) if peak else None))
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "gemm_peak_tflops": peak,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    return rows, env


def run_experts_sweep(spec: LayerBenchSpec, experts: list[int]) -> list[dict]:
    """The layer bench at each expert count (same shape, same active FLOPs): one row per E with our
    layer's and DeepSpeed's time relative to the dense FFN, and our minor page faults per step."""
    out = []
    for e in experts:
        rows, env = run_layer_bench(dataclasses.replace(spec, experts=e))
        by = {r.name.split(" (")[0]: r for r in rows}
        ours = by.get(f"PatchMoE P={spec.patch}")
        ds = next((r for r in rows if r.name.startswith("DeepSpeed")), None)
        out.append({"experts": e, "dense_ms": rows[0].ms_median,
                    "patchmoe_ms": ours.ms_median if ours else None,
                    "patchmoe_x_dense": ours.ratio_to_dense if ours else None,
                    "tokenmoe_x_dense": by["TokenMoE P=1"].ratio_to_dense if "TokenMoE P=1" in by else None,
                    "deepspeed_x_dense": ds.ratio_to_dense if ds else None,
                    "patchmoe_faults_per_step": ours.page_faults_per_step if ours else None,
                    "device": env["device"], "threads": env["threads"]})
    return out


def sweep_table(spec: LayerBenchSpec, sweep: list[dict]) -> list[str]:
    """The sweep as Markdown lines (printed by ``msmoe bench layer --experts-sweep``, and a section of the
    scaling report)."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    lines = [f"B={spec.batch} {spec.height}x{spec.width} C={spec.dim} F={spec.hidden} K={spec.top_k} P={spec.patch}, "
             f"{spec.dtype}, {sweep[0]['device']}, {sweep[0]['threads']} thread(s); paired medians over "
             f"{spec.repeats} rounds (x dense: time / the dense FFN of equal active FLOPs, same round)", "",
             "| E | PatchMoE x dense | TokenMoE x dense | DeepSpeed MoE x dense | PatchMoE minor faults/step |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['experts']} | {f(r['patchmoe_x_dense'], '.2f')} | {f(r['tokenmoe_x_dense'], '.2f')} | "
              f"{f(r['deepspeed_x_dense'], '.2f')} | {f(r['patchmoe_faults_per_step'], ',.0f')} |" for r in sweep]
    return lines


def print_rows(spec: LayerBenchSpec, rows: list[BenchRow], env: dict) -> None:
    print(f"layer bench: B={spec.batch} H={spec.height} W={spec.width} C={spec.dim} F={spec.hidden} "
          f"E={spec.experts} K={spec.top_k} P={spec.patch} dtype={spec.dtype} device={env['device']} "
          f"threads={env['threads']} rounds={spec.repeats} (contenders alternate)")
    if "allocator" in env:
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
        print(f"dense GEMM peak measured: {env['gemm_peak_tflops']:.1f} TFLOP/s ({spec.dtype})")
    by_name = {r.name: r for r in rows}
    for r in rows:
        eager = by_name.get(r.name.removesuffix(" compiled")) if r.name.endswith(" compiled") else None
        if eager is not None:
            ratio = statistics.median(a / b for a, b in zip(r.ms_rounds, eager.ms_rounds))
            print(f"{eager.name}: compiled / eager {ratio:.2f} (median over rounds, same round; "
                  f"{r.ms_median:.2f} vs {eager.ms_median:.2f} ms)")
    print("x dense / x DS: median over rounds of the time relative to the dense FFN / DeepSpeed's layer "
          "in the same round (lower is faster; DS throughput / ours = x DS); faults/step: minor page faults; "
          "GFLOP per step (fwd+bwd, expert matmuls): " + f"{rows[0].gflop_per_step:.2f}")

"""gpu-check section "bench": the layer benchmark at the GPU shape, against the issue's goals.

  python3 -m gpucheck.sections.benchmark --json runs/gpu-check/bench.json                  # cuda, bf16, --shape gpu
  python -m gpucheck.sections.benchmark --json /tmp/b.json --device cpu --quick             # small shape, fp32

Runs the real command (a process of its own):
  msmoe bench layer --device cuda --dtype bf16 --shape gpu --skip fairscale --json ...
(B=16, 80x80, C=512, F=2048, E=16, K=2, P=8; fairscale's dense dispatch is left out at this size,
DeepSpeed's layer is fed 16,384 tokens per call: its gating tensors grow with tokens^2)
and reads its rows: TFLOP/s of every contender, its share of the dense bf16 GEMM rate measured in
the same run, and its time against DeepSpeed's layer. Goals (issue 13), reported as met or not:
  PatchMoE fwd+bwd >= ``GOAL_GEMM_SHARE`` of the measured dense bf16 GEMM rate
  PatchMoE throughput >= ``GOAL_VS_DEEPSPEED`` x DeepSpeed's layer
The section passes when the benchmark ran; the goals are targets, reported beside it.

Then the expert-count sweep (issue 17: the step cost stays flat in E at fixed active FLOPs), at the
thesis shape, reported as a table beside it (a sweep that fails is named, the section still passes):
  msmoe bench layer --device cuda --dtype bf16 --shape thesis --experts-sweep 8,64,256 ...
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from gpucheck import section
from launcher.command import msmoe_command

GOAL_GEMM_SHARE = 0.5
GOAL_VS_DEEPSPEED = 1.5
OURS = "PatchMoE P="
DEEPSPEED_GROUP = 16384  # tokens per DeepSpeed MoE call at the GPU shape (all 102,400 at once: ~100 GB of gating)


QUICK_SHAPE = ["--shape", "small", "--batch", "2", "--height", "16", "--width", "16", "--repeats", "2", "--warmup", "1"]
SWEEP_EXPERTS = "8,64,256"


def layer_bench(args, shape: list[str], out: str) -> list[str]:
    """``msmoe bench layer`` at ``shape`` (bf16 on CUDA, fp32 on CPU), its rows into ``out``."""
    dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    return msmoe_command(["bench", "layer", "--device", args.device, "--dtype", dtype, *shape, "--skip", "fairscale",
                          "--json", out])


def bench_command(args) -> list[str]:
    # DeepSpeed's gating is quadratic in tokens per call: 16,384 per call (a usual micro-batch)
    shape = QUICK_SHAPE if args.quick else ["--shape", "gpu", "--repeats", "10", "--warmup", "3",
                                            "--deepspeed-group", str(DEEPSPEED_GROUP)]
    return layer_bench(args, shape, os.path.join(args.workdir, "layer.json"))


def sweep_command(args) -> list[str]:
    shape = ([*QUICK_SHAPE, "--experts-sweep", "4,16"] if args.quick else
             ["--shape", "thesis", "--repeats", "5", "--warmup", "2", "--experts-sweep", SWEEP_EXPERTS])
    return layer_bench(args, shape, os.path.join(args.workdir, "sweep.json"))


def run_sweep(args) -> dict:
    """The expert-count sweep: {"rows": [...]} from its JSON, or {"error": ...} naming why it has none."""
    log = os.path.join(args.workdir, "sweep.log")
    try:
        with open(log, "w") as fh:
            code = subprocess.run(sweep_command(args), stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=args.sweep_timeout).returncode
    except subprocess.TimeoutExpired:
        return {"error": f"the sweep ran past {args.sweep_timeout:g} s (log: {log})"}
    path = os.path.join(args.workdir, "sweep.json")
    if code != 0 or not os.path.isfile(path):
        with open(log) as fh:
            lines = [ln for ln in fh.read().splitlines() if ln.strip()]
        return {"error": f"bench layer --experts-sweep exited {code}: {lines[-1][:300] if lines else ''}"}
    with open(path) as fh:
        data = json.load(fh)
    return {"rows": data["sweep"], "shape": data["args"].get("shape")}


def goals(rows: list[dict]) -> dict:
    ours = next((r for r in rows if r["name"].startswith(OURS)), None)
    out = {}
    share = ours.get("fraction_of_gemm_peak") if ours else None
    out["PatchMoE share of dense GEMM rate"] = {
        "value": share, "target": GOAL_GEMM_SHARE, "met": None if share is None else share >= GOAL_GEMM_SHARE}
    speedup = 1.0 / ours["ratio_to_deepspeed"] if ours and ours.get("ratio_to_deepspeed") else None
    out["PatchMoE throughput / DeepSpeed's"] = {
        "value": speedup, "target": GOAL_VS_DEEPSPEED, "met": None if speedup is None else speedup >= GOAL_VS_DEEPSPEED}
    return out


def check(args) -> tuple[bool, str, dict, list]:
    cmd = bench_command(args)
    log = os.path.join(args.workdir, "layer.log")
    with open(log, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=args.run_timeout).returncode
    with open(log) as fh:
        text = fh.read()
    result = os.path.join(args.workdir, "layer.json")
    if code != 0 or not os.path.isfile(result):
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return False, f"bench layer exited {code}: {lines[-1][:300] if lines else ''}", {}, [{"tail": text[-3000:]}]
    with open(result) as fh:
        data = json.load(fh)
    rows = [{k: r[k] for k in ("name", "ms_median", "tflops", "fraction_of_gemm_peak", "ratio_to_dense",
                                "ratio_to_deepspeed")} for r in data["rows"]]
    g = goals(rows)
    peak = data["env"].get("gemm_peak_tflops")

    def fmt(goal):
        v = goal["value"]
        return "n/a" if v is None else f"{v:.2f} ({'met' if goal['met'] else 'NOT met'}, goal {goal['target']:g})"
    summary = (f"{len(rows)} contenders; dense GEMM {peak:.0f} TFLOP/s; " if peak else f"{len(rows)} contenders; ") + \
        "; ".join(f"{name}: {fmt(goal)}" for name, goal in g.items())
    sweep = run_sweep(args)
    summary += "; experts sweep: " + (sweep["error"] if "error" in sweep else ", ".join(
        f"E={r['experts']} {r['patchmoe_x_dense']:.2f}x dense" for r in sweep["rows"] if r.get("patchmoe_x_dense")))
    figures = {"gemm_peak_tflops": peak, "goals": g, "shape": data["args"].get("shape"), "dtype": data["args"]["dtype"],
               "gpu": data["env"].get("gpu"), "printed": text[-2500:], "experts_sweep": sweep}
    return True, summary, figures, rows


def _options(p) -> None:
    p.add_argument("--run-timeout", type=float, default=150.0)
    p.add_argument("--sweep-timeout", type=float, default=90.0)


def main(argv: list[str] | None = None) -> int:
    return section.run("bench", check, __doc__, argv, extra=_options)


if __name__ == "__main__":
    sys.exit(main())

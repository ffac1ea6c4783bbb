"""``make gpu-check``: the first run on a GPU node, as one prepared command (at most 8 minutes).

  make gpu-check OUT=runs/gpu-check          # on the node: installs .whl/ into /tmp/msmoe-site, then:
  PYTHONPATH=/tmp/msmoe-site:. python3 -m gpucheck.check --out runs/gpu-check
  python -m gpucheck.check --out /tmp/gc --allow-cpu --device cpu --quick    # dry run of every section on CPU

Sections run from the caller's folder (a --config of the train section is the caller's path), each a
process of its own with its own time budget (a crash, hang or CUDA error in one
loses nothing else); ``--only layers,bench`` runs some of them:
  tests     the fast test suite (-m "not slow") under the node's own Python and torch, in parallel
            shards beside layers/dispatch/syncs/train, never beside the benchmark (gpucheck/suite.py)
  layers    every MoE layer on CUDA vs the float64 loop reference, fp32 and bf16 (gpucheck/sections/layers.py)
  dispatch  the all-to-all dispatcher: one-rank NCCL, two processes over gloo (gpucheck/sections/dispatch.py)
  syncs     host syncs per training step, CUDA's sync debug mode (gpucheck/sections/syncs.py)
  train     the ReID job, configs/h100.yaml, bf16, ZeRO 0 and 1, through the CLI (gpucheck/sections/train.py)
  bench     msmoe bench layer --shape gpu, bf16: TFLOP/s, share of GEMM peak, vs DeepSpeed; the expert-count
            sweep at the thesis shape (gpucheck/sections/benchmark.py)
Writes into OUT: gpu-check.log (everything), <section>.log, <section>.json, results.json and
results.md (the table for the closing note). Exit code 0 when every section passed, 1 otherwise,
2 when it cannot start here (no CUDA, no torch, bundle not installed) -- one line, no traceback.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

from gpucheck.process import wait_or_kill
from gpucheck.suite import SuiteRun
from parallel.launchenv import with_on_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 470  # the whole check, on one H100; 8 minutes with start-up to spare


@dataclass(frozen=True)
class Section:
    name: str
    module: str
    budget_s: float  # wall-clock limit of the section's process
    args: tuple[str, ...] = ()


SECTIONS = (
    Section("layers", "gpucheck.sections.layers", 60),
    Section("dispatch", "gpucheck.sections.dispatch", 60),
    Section("syncs", "gpucheck.sections.syncs", 75),
    Section("train", "gpucheck.sections.train", 200, ("--run-timeout", "85", "--budget-s", "190")),
    Section("bench", "gpucheck.sections.benchmark", 160, ("--run-timeout", "80", "--sweep-timeout", "70")),
)
TESTS_BUDGET_S = 300
PREPARE_LIMIT_S = 600  # DeepSpeed's CPU op build before the sections (~1 min on 2 cores); outside every budget


class Log:
    """Prints and appends to OUT/gpu-check.log."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        with open(self.path, "a") as fh:
            fh.write(msg + "\n")

    def append_file(self, title: str, path: str) -> None:
        if os.path.isfile(path):
            with open(path, errors="replace") as src, open(self.path, "a") as fh:
                fh.write(f"\n===== {title} ({path}) =====\n{src.read()}\n")


def cannot_start(device: str, need_bundle: bool) -> str | None:
    """Why the check cannot run here (one line), or None."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure is the same answer
        return (f"gpu-check: torch does not import in {sys.executable} ({type(exc).__name__}: {exc}); "
                "run it with the GPU image's python3 (make gpu-check GPU_PYTHON=...)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return (f"gpu-check: no CUDA device visible to torch {torch.__version__} in {sys.executable}: it runs on a "
                "GPU node (make gpu-check there); --allow-cpu --device cpu is a dry run")
    if need_bundle:
        missing = [m for m in ("deepspeed", "datasets", "fairscale") if importlib.util.find_spec(m) is None]
        if missing:
            return (f"gpu-check: {', '.join(missing)} not importable: build the bundle with make gpu-bundle, bring "
                    ".whl/ with the checkout and run make gpu-check (it installs .whl/ into /tmp/msmoe-site)")
    return None


def section_command(s: Section, args, out: str) -> list[str]:
    cmd = [sys.executable, "-m", s.module, "--json", os.path.join(out, f"{s.name}.json"), "--device", args.device,
           "--workdir", os.path.join(out, s.name), *s.args]
    return cmd + (["--quick"] if args.quick else [])


def run_section(s: Section, cmd: list[str], out: str, log: Log, budget: float) -> dict:
    log(f"[{s.name}] {' '.join(cmd)}  (budget {budget:.0f} s)")
    path = os.path.join(out, f"{s.name}.log")
    t0 = time.perf_counter()
    with open(path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=with_on_path(ROOT), start_new_session=True)
        code = wait_or_kill(proc, budget)
    return finish_section(s.name, code, time.perf_counter() - t0, out, log, budget)


def prepare_ops(out: str, log: Log) -> None:
    """Build DeepSpeed's CPU communication op before any section starts (parallel/ds_ops.py), with
    CUDA hidden as the CPU-only processes of the check see it: a build inside a section's time budget
    was killed half-way and left a lock every later DeepSpeed init waited on."""
    cmd = [sys.executable, "-m", "parallel.ds_ops"]
    log(f"[prepare] {' '.join(cmd)}  (before the sections, outside their budgets)")
    t0 = time.perf_counter()
    path = os.path.join(out, "prepare.log")
    with open(path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**with_on_path(ROOT), "CUDA_VISIBLE_DEVICES": ""})
        code = wait_or_kill(proc, PREPARE_LIMIT_S)
    with open(path, errors="replace") as fh:
        said = [ln for ln in fh.read().splitlines() if ln.startswith(("msmoe:", "DeepSpeed's CPU"))]
    for line in said:
        log(f"[prepare] {line}")
    log(f"[prepare] {'done' if code == 0 else f'exit {code} (see prepare.log); the sections go on'} in "
        f"{time.perf_counter() - t0:.0f} s")


def finish_section(name: str, code: int, secs: float, out: str, log: Log, budget: float) -> dict:
    log.append_file(name, os.path.join(out, f"{name}.log"))
    path = os.path.join(out, f"{name}.json")
    if os.path.isfile(path) and code != 124:
        with open(path) as fh:
            res = json.load(fh)
    else:
        why = f"over its budget of {budget:.0f} s" if code == 124 else f"exited {code} without a result"
        res = {"section": name, "passed": False, "summary": why, "figures": {}, "rows": []}
    res.update(exit=code, seconds=round(secs, 1))
    log(f"[{name}] {'PASS' if res['passed'] else 'FAIL'} in {secs:.0f} s: {res['summary']}")
    return res


def finish_tests(suite: "SuiteRun", out: str, log: Log) -> dict:
    res = suite.wait()
    return finish_section("tests", 0 if res["passed"] else 1, res["figures"].get("suite_s", 0.0), out, log,
                          TESTS_BUDGET_S)


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": device, "host": platform.node(), "started": datetime.datetime.now().isoformat(timespec="seconds")}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
    for mod in ("deepspeed", "datasets", "fairscale"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, the sections say what it breaks
            env[mod] = f"not importable: {type(exc).__name__}"
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip() or None
    except OSError:
        env["commit"] = None
    return env


def run_all(args) -> int:
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # a rerun replaces the previous results, not its run folders
        if name.endswith((".json", ".log", ".xml", ".md")):
            os.remove(os.path.join(out, name))
    log = Log(os.path.join(out, "gpu-check.log"))
    env = environment(args.device)
    log(f"gpu-check: {json.dumps(env)}")
    wanted = set(args.only.split(",")) if args.only else {s.name for s in SECTIONS} | {"tests"}
    prepare_ops(out, log)
    t_start = time.perf_counter()
    results: dict[str, dict] = {}

    suite = None
    if "tests" in wanted:
        suite = SuiteRun(ROOT, out, args.quick, TESTS_BUDGET_S)
        for cmd in suite.commands():
            log(f"[tests] {cmd}  (budget {TESTS_BUDGET_S} s, beside the correctness sections)")
    for s in SECTIONS:
        if s.name == "bench" and suite is not None:  # timings alone on the machine
            results["tests"] = finish_tests(suite, out, log)
            suite = None
        if s.name not in wanted:
            continue
        left = DEADLINE_S - (time.perf_counter() - t_start)
        if left < 20:
            results[s.name] = {"section": s.name, "passed": False, "summary": "not run: the check's time was spent",
                               "figures": {}, "rows": []}
            continue
        results[s.name] = run_section(s, section_command(s, args, out), out, log, min(s.budget_s, left))
    if suite is not None:
        results["tests"] = finish_tests(suite, out, log)

    wall = time.perf_counter() - t_start
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"environment": env, "wall_s": round(wall, 1), "sections": results}, fh, indent=2, default=str)
    from gpucheck.report import markdown

    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(markdown(env, results, wall))
    passed = all(r["passed"] for r in results.values())
    log(f"gpu-check: {'PASS' if passed else 'FAIL'} in {wall:.0f} s: "
        + ", ".join(f"{n} {'ok' if r['passed'] else 'FAIL'}" for n, r in results.items())
        + f"; results: {os.path.join(out, 'results.md')}")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu-check", help="folder for the log, results.json and results.md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--only", default=None, help="comma list of sections: tests,layers,dispatch,syncs,train,bench")
    p.add_argument("--preflight", action="store_true", help="only say whether the check can start here")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # dry runs: --device cpu
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # tiny sizes for dry runs and tests
    args = p.parse_args(argv)
    if args.device != "cuda" and not args.allow_cpu:
        print(f"gpu-check: --device {args.device} needs --allow-cpu (a dry run, not the check)", file=sys.stderr)
        return 2
    reason = cannot_start(args.device, need_bundle=not args.preflight)
    if reason:
        print(reason, file=sys.stderr)
        return 2
    if args.preflight:
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())

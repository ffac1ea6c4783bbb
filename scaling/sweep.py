"""The scaling sweep (``msmoe scale``; command line in launcher/scale.py): a throughput sweep over
world size, EP size and expert count, as JSON lines.

Each point is a short, real ``msmoe train`` run (DeepSpeed engine, expert parallel, the ReID
model); its ``summary.json`` becomes one JSON line with samples/s, patches/s per rank, the
step-time breakdown, all-to-all bytes, peak memory per rank, expert load balance and the
dropped fraction. Modes: ``strong`` keeps the global batch (train.p identities x train.k) fixed
as ranks grow; ``weak`` keeps the per-rank batch fixed (train.p grows with the world size).

  msmoe scale --config configs/scale.yaml --world 1,2 --ep 1,2 --experts 4,8     # local torchrun
  msmoe scale ... --slurm --gpus-per-node 8 --partition gpu --time 00:30:00      # one SLURM job per
                                                                                 # world size (arrays)
  msmoe scale --collect runs/scale --out runs/scale/points.jsonl                 # summaries -> JSON lines
  msmoe report --points runs/scale/points.jsonl --out runs/scale                 # report.md + plots

EP sizes that do not divide the world size or the expert count are skipped (and said so).
"""

from __future__ import annotations

import glob
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass

from common.errors import UserError
from scaling.campaign import Campaign, Command, Run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINT_PREFIX = "scale"


class ScaleError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class SweepSpec:
    """How to run the points: the base config, steps per point, where runs and JSON lines go, and
    for SLURM the allocation of each job."""

    config: str = "configs/scale.yaml"
    steps: int = 24  # training steps per point (the first 3 are not timed)
    run_root: str = "runs/scale"
    out: str = "runs/scale/points.jsonl"
    gpus_per_node: int = 8
    partition: str | None = None
    time: str = "00:30:00"
    device: str = "cuda"
    dry_run: bool = False  # SLURM: print the job scripts only
    sample_every: int | None = None  # train.log_every: the stage breakdown is timed on one step per this many
                                     # (None: steps // 4)


@dataclass(frozen=True)
class Point:
    mode: str  # "strong" | "weak"
    world: int
    ep: int
    experts: int

    @property
    def name(self) -> str:
        return f"{POINT_PREFIX}-{self.mode}-w{self.world}-ep{self.ep}-e{self.experts}"

    def overrides(self, base_p: int) -> list[str]:
        p = base_p * self.world if self.mode == "weak" else base_p
        return [f"name={self.name}", f"train.ep_size={self.ep}", f"train.p={p}",
                f"model.patch_moe.router.num_experts={self.experts}"]


def plan(worlds: list[int], eps: list[int], experts: list[int], modes: list[str]) -> tuple[list[Point], list[str]]:
    """The points to run, and why the others are left out. Weak and strong agree at one rank: run it once."""
    points, skipped = [], []
    for mode in modes:
        for w in worlds:
            if mode == "weak" and w == 1 and "strong" in modes:
                continue
            for ep in eps:
                for e in experts:
                    if w % ep or e % ep:
                        skipped.append(f"world {w}, EP {ep}, {e} experts: EP must divide both")
                        continue
                    points.append(Point(mode, w, ep, e))
    return points, skipped


def environment() -> dict:
    """What the numbers were measured on (recorded in every line and in the report)."""
    import torch

    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001 - an optional peer missing is a fact to record, not an error
            return None

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "python": platform.python_version(), "torch": torch.__version__, "deepspeed": version("deepspeed"),
        "host": platform.node(), "os": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cuda": torch.version.cuda, "git_commit": commit.stdout.strip() or None,
    }


def point_record(summary: dict, mode: str | None = None) -> dict:
    """One JSON line from a run's summary.json."""
    cfg = summary["config"]
    ms = dict(summary["step_time_ms"])
    moe_ms = sum(ms.get(k, 0.0) for k in ("route", "dispatch", "experts", "combine"))
    ms["forward_other"] = max(ms.get("forward", 0.0) - moe_ms, 0.0)
    world = summary["world_size"]
    steps = max(summary["steps"], 1)
    loads = summary["history"]["load"]  # [interval][layer][expert], routed (unit, expert) pairs over all ranks
    routed_per_step = sum(sum(sum(layer) for layer in interval) for interval in loads) / steps
    step_s = ms["step"] / 1000 if ms.get("step") else 0.0
    fractions = {k: v["fraction"] for k, v in summary["expert_load"].items()}
    imbalance = {k: (max(f) * len(f) if f else 0.0) for k, f in fractions.items()}  # max/mean share, 1 = even
    name = summary["name"]
    return {
        "name": name,
        "mode": mode or ("weak" if "-weak-" in name else "strong"),
        "world_size": world, "ep_size": summary["ep_size"], "num_experts": summary["num_experts"],
        "threads_per_rank": summary.get("threads_per_rank"),
        "expert_params": ((summary.get("model_cost") or {}).get("parameters") or {}).get("experts"),
        "top_k": ((cfg.get("model") or {}).get("patch_moe") or {}).get("router", {}).get("top_k"),
        "precision": cfg["train"].get("precision"), "model_config": cfg.get("model"),
        "global_batch": cfg["train"]["p"] * cfg["train"]["k"],
        "per_rank_batch": cfg["train"]["p"] * cfg["train"]["k"] // world,
        "steps": summary["steps"], "moe_layers": summary["moe_layers"],
        "samples_per_s": summary["samples_per_s"],
        "patches_per_s_per_rank": (routed_per_step / step_s / world) if step_s else 0.0,
        "step_time_ms": ms,
        "a2a_bytes_per_step": summary["a2a_bytes_per_step"],
        "peak_mem_mb_per_rank": summary.get("peak_mem_mb_per_rank") or [summary["peak_rss_mb"]],
        "expert_load_fraction": fractions,
        "load_imbalance": imbalance,
        "dropped_fraction": summary["dropped_fraction"],
        "final_loss": summary["final_loss"], "map": summary.get("map"),
        "device": summary["device"], "backend": summary["backend"],
        # where the ranks ran: nodes (LOCAL_WORLD_SIZE ranks each), the transport, and on an emulated
        # cluster (scaling/cluster_sweep.py) its shaped link; the dense parameters (their gradient all-reduce)
        "nodes": summary.get("nodes"), "transport": summary.get("transport"),
        "cluster": summary.get("cluster"),
        "dense_params": ((summary.get("model_cost") or {}).get("parameters") or {}).get("dense"),
        "moe_kind": (cfg.get("model") or {}).get("moe_kind"),
    }


def collect(run_root: str, out: str, env: dict | None = None) -> list[dict]:
    """Every ``<run_root>/scale-*/summary.json`` -> one JSON line each (sorted), written to ``out``."""
    paths = sorted(glob.glob(os.path.join(run_root, f"{POINT_PREFIX}-*", "summary.json")))
    if not paths:
        raise FileNotFoundError(f"no {POINT_PREFIX}-*/summary.json under {run_root}: run `msmoe scale` first")
    env = env or environment()
    records = []
    for p in paths:
        with open(p) as fh:
            rec = point_record(json.load(fh))
        rec["env"] = env
        records.append(rec)
    records.sort(key=lambda r: (r["mode"], r["world_size"], r["ep_size"], r["num_experts"]))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return records


def _campaign(spec: SweepSpec, command: Command) -> Campaign:
    return Campaign(command, log_dir=spec.run_root, error=ScaleError, what="scale point")


def point_runs(points: list[Point], spec: SweepSpec, extra: list[str]) -> list[Run]:
    """Each point as ``msmoe train`` under torchrun with its world size, every override checked
    here first (a point the config cannot run fails before anything starts, named)."""
    from training.config import load_config

    base = load_config(spec.config, extra)
    runs = []
    for pt in points:
        over = [*extra, *pt.overrides(base.train.p), f"out_dir={spec.run_root}", "eval.untrained=false",
                f"train.steps={spec.steps}", f"train.ckpt_every={10**9}",
                f"train.log_every={spec.sample_every or max(spec.steps // 4, 1)}"]
        load_config(spec.config, over)
        runs.append(Run(pt.name, f"{pt.mode:6s} world {pt.world}  EP {pt.ep}  {pt.experts} experts",
                        ("train", "--config", spec.config, "--no-progress", "--overwrite", *over),  # measured afresh
                        nproc=pt.world))
    return runs


def run_local(points: list[Point], spec: SweepSpec, extra: list[str], command: Command) -> None:
    """Each point as a torchrun job on this machine, one after the other (``command``:
    launcher/command.py ``msmoe_command``); a point that fails raises ScaleError naming it."""

    def result(run: Run, _out: str) -> str:
        with open(os.path.join(spec.run_root, run.name, "summary.json")) as fh:
            s = json.load(fh)
        return f"{s['samples_per_s']:8.1f} samples/s   step {s['step_time_ms']['step']:7.1f} ms"

    _campaign(spec, command).run_all(point_runs(points, spec, extra), result=result)


def run_slurm(points: list[Point], spec: SweepSpec, extra: list[str], command: Command) -> None:
    """One ``msmoe submit`` per (mode, world size): a job array over the EP sizes and expert counts."""
    from training.config import load_config

    base = load_config(spec.config, extra)
    by_world: dict[tuple[str, int], list[Point]] = {}
    for pt in points:
        by_world.setdefault((pt.mode, pt.world), []).append(pt)
    camp = _campaign(spec, command)
    for (mode, world), pts in by_world.items():
        if world % spec.gpus_per_node:
            raise ScaleError(f"world size {world} is not a multiple of --gpus-per-node {spec.gpus_per_node}")
        p = base.train.p * world if mode == "weak" else base.train.p
        name = f"{POINT_PREFIX}-{mode}-w{world}"
        submit = _submit_args(spec, world // spec.gpus_per_node, pts)
        train = ["--config", spec.config, *extra, f"name={name}", f"train.p={p}", f"out_dir={spec.run_root}",
                 "eval.untrained=false", f"train.steps={spec.steps}"]
        print(" ".join(command(["submit", *submit, "--", *train])), flush=True)
        sys.stdout.write(camp.submit(name, submit, train))
    print(f"when the jobs are done: msmoe scale --collect {spec.run_root} --out {spec.out}")


def _submit_args(spec: SweepSpec, nodes: int, pts: list[Point]) -> list[str]:
    """msmoe submit's options for one world size: the allocation, and a --sweep per varied setting."""
    args = ["--nodes", str(nodes), "--gpus-per-node", str(spec.gpus_per_node), "--time", spec.time,
            "--device", spec.device]
    if spec.partition:
        args += ["--partition", spec.partition]
    for key, values in (("train.ep_size", {q.ep for q in pts}),
                        ("model.patch_moe.router.num_experts", {q.experts for q in pts})):
        args += ["--sweep", f"{key}={','.join(str(v) for v in sorted(values))}"]
    if spec.dry_run:
        args.append("--dry-run")
    return args

"""``msmoe submit``: a SLURM batch job (or job array) that runs ``msmoe train`` on N nodes.

  msmoe submit --nodes 4 --gpus-per-node 8 --time 04:00:00 --partition gpu -- --config configs/gpu.yaml
  msmoe submit --nodes 1 --gpus-per-node 2 --device cpu --time 00:10:00 --partition debug -- --config configs/tiny.yaml
  msmoe submit ... --sweep train.ep_size=1,2 --sweep model.patch_moe.router.num_experts=4,8 -- --config ...
  msmoe submit ... --dry-run                      # print the script, submit nothing

The script (written to runs/<name>/submit.sbatch) starts one task per node with srun; each task
runs torchrun with a c10d rendezvous on the first node of the allocation. Preemption and time
limits: ``--signal=USR1@<warn>`` makes SLURM signal the tasks before the end; torchrun forwards
SIGUSR1/SIGTERM to the trainers, which stop after the same step on every rank, checkpoint, and
requeue the job (``scontrol requeue``, allowed by ``--requeue``); the requeued job starts the
same script, and ``--auto-resume`` continues from that checkpoint. ``--sweep key=a,b`` (repeatable)
makes a job array over the cartesian product of the values, one run name per element.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

from common.errors import UserError
from launcher.command import msmoe_command
from parallel.launchenv import FORWARDED_SIGNALS
from training.checkpoint.store import COMPLETE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SubmitError(UserError, ValueError):
    pass


def _name_and_outdir(train_args: list[str]) -> tuple[str, str]:
    """The run name and out_dir the training will use (config file + overrides), to place files."""
    from training.config import load_config

    config, overrides, i = None, [], 0
    while i < len(train_args):
        a = train_args[i]
        if a == "--config":
            config, i = train_args[i + 1], i + 2
            continue
        if a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        i += 1
    cfg = load_config(config or "configs/default.yaml", overrides)
    return cfg.name, cfg.out_dir


def sweep_points(sweeps: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x,y'] -> [['a=1','b=x'], ['a=1','b=y'], ['a=2','b=x'], ['a=2','b=y']]."""
    axes = []
    for s in sweeps:
        if "=" not in s:
            raise SubmitError(f"--sweep {s!r} must look like key=value1,value2")
        key, values = s.split("=", 1)
        axes.append([f"{key}={v}" for v in values.split(",") if v != ""])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


CPUS_PER_PROCESS = {"cuda": 8, "cpu": 1}  # the default when the node's size is not known (--dry-run)


def default_cpus_per_task(device: str, procs_per_node: int) -> int:
    return CPUS_PER_PROCESS[device] * procs_per_node


def node_cpus(partition: str | None, run=subprocess.run) -> int | None:
    """CPUs of the smallest node of ``partition`` (``sinfo``); None if SLURM does not say."""
    cmd = ["sinfo", "--noheader", "--format=%c"] + ([f"--partition={partition}"] if partition else [])
    try:
        proc = run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    counts = [int(tok.rstrip("+")) for tok in proc.stdout.split() if tok.rstrip("+").isdigit()]
    return min(counts) if proc.returncode == 0 and counts else None


def resolve_cpus_per_task(requested: str, device: str, procs_per_node: int, partition: str | None,
                          ask_slurm: bool, run=subprocess.run) -> int:
    """``--cpus-per-task``: a number, or "node" (default): every CPU of a node of the partition, as
    ``sinfo`` reports it; without SLURM to ask (``--dry-run``) 8 per GPU process, 1 per CPU process."""
    if requested != "node":
        if not requested.isdigit() or int(requested) < 1:
            raise SubmitError(f"--cpus-per-task {requested!r} must be a number >= 1, or 'node' (all CPUs of a node)")
        return int(requested)
    found = node_cpus(partition, run) if ask_slurm else None
    return found if found else default_cpus_per_task(device, procs_per_node)


@dataclass(frozen=True)
class JobScript:
    """What one ``submit.sbatch`` is made of (``render_script``); ``points``: the sweep's override
    lists, a job array when there are two or more."""

    name: str
    run_dir: str
    nodes: int
    procs_per_node: int
    time: str
    partition: str | None
    device: str
    train_args: list[str]
    python: str
    root: str
    port: int = 29500
    signal_warn_s: int = 120
    cpus_per_task: int | None = None
    points: list[list[str]] | None = None
    account: str | None = None

    @property
    def array(self) -> bool:
        return self.points is not None and len(self.points) > 1


def _sbatch_header(job: JobScript) -> list[str]:
    """The #SBATCH lines, the shell options and the job's first line of output."""
    out = os.path.join(job.run_dir, "slurm-%A_%a.out" if job.array else "slurm-%j.out")
    lines = ["#!/bin/bash", f"#SBATCH --job-name=msmoe-{job.name}", f"#SBATCH --nodes={job.nodes}",
             "#SBATCH --ntasks-per-node=1"]
    if job.device == "cuda":
        lines.append(f"#SBATCH --gpus-per-node={job.procs_per_node}")
    cpus = job.cpus_per_task if job.cpus_per_task is not None else default_cpus_per_task(job.device,
                                                                                        job.procs_per_node)
    lines.append(f"#SBATCH --cpus-per-task={cpus}")  # the one task per node runs all its processes
    lines.append(f"#SBATCH --time={job.time}")
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        lines.append(f"#SBATCH --account={job.account}")
    if job.array:
        lines.append(f"#SBATCH --array=0-{len(job.points) - 1}")
    return lines + [
        f"#SBATCH --output={out}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --signal=USR1@{job.signal_warn_s}",
        "#SBATCH --requeue",
        "# Written by `msmoe submit`; resubmit with: sbatch " + os.path.join(job.run_dir, "submit.sbatch"),
        "set -euo pipefail",
        # sbatch ran where `msmoe submit` ran: the user's relative paths (--config, out_dir) hold there
        'cd "$SLURM_SUBMIT_DIR"',
        f"export PYTHONPATH={shlex.quote(job.root)}${{PYTHONPATH:+:$PYTHONPATH}}",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f'echo "msmoe: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST, '
        f'rendezvous $head_node:{job.port}"',
    ]


def _run_dir_lines(job: JobScript) -> tuple[list[str], list[str], str, str]:
    """-> (lines setting $run_dir, the train arguments, what the array adds to them, torchrun's rdzv id).
    A job array picks its point and run name from its task id; one job takes its single point's overrides."""
    if not job.array:
        train_args = [*job.train_args, *job.points[0]] if job.points and job.points[0] else job.train_args
        return [f"run_dir={shlex.quote(job.run_dir)}"], train_args, "", "$SLURM_JOB_ID"
    run_base = os.path.dirname(job.run_dir.rstrip("/")) or "."
    lines = ["sweep=(", *("  " + shlex.quote(" ".join(p)) for p in job.points), ")",
             'point=${sweep[$SLURM_ARRAY_TASK_ID]}',
             f'run_name={shlex.quote(job.name)}-$SLURM_ARRAY_TASK_ID',
             f'run_dir={shlex.quote(run_base)}/$run_name']
    return lines, job.train_args, " $point name=$run_name", "$SLURM_ARRAY_JOB_ID-$SLURM_ARRAY_TASK_ID"


def _train_command(job: JobScript, train_args: list[str], extra: str, rdzv_id: str) -> str:
    """torchrun of ``msmoe train`` on every node, shell-quoted except the variables SLURM fills in."""
    torchrun = msmoe_command(["train", "--auto-resume", "--no-progress"], nproc=job.procs_per_node,
                             python=job.python, nnodes="$SLURM_NNODES", rdzv_endpoint=f"$head_node:{job.port}",
                             rdzv_id=rdzv_id, options=[f"--signals-to-handle={FORWARDED_SIGNALS}",
                                                       "--shutdown-timeout=300"])
    cmd = " ".join(shlex.quote(c) if not c.startswith(("--nnodes=$", "--rdzv_endpoint=$", "--rdzv_id=$")) else c
                   for c in torchrun)
    return cmd + " " + " ".join(shlex.quote(a) for a in train_args) + extra


def render_script(job: JobScript) -> str:
    """The batch script of ``job`` (tests/golden/ holds one)."""
    run_lines, train_args, extra, rdzv_id = _run_dir_lines(job)
    n = job.procs_per_node
    lines = _sbatch_header(job) + run_lines + [
        # The trainer writes $run_dir/COMPLETE once the run is finished and reported. torchrun exits
        # non-zero whenever it was signalled, even when the signal came after the last step (during the
        # final evaluation) and the workers finished normally: that is still a finished job.
        f'rm -f "$run_dir/{COMPLETE}"',
        # threads per worker from the allocation, unless set: the task's CPUs over its processes (at least 1);
        # `msmoe train` gives torch the same count (parallel/threads.py)
        f"threads=$(( ${{SLURM_CPUS_PER_TASK:-{n}}} / {n} ))",
        'export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}',
        "status=0",
        # srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05): ask again, or the task gets one CPU
        "srun --ntasks-per-node=1 --cpus-per-task=$SLURM_CPUS_PER_TASK --kill-on-bad-exit=1 "
        f"{_train_command(job, train_args, extra, rdzv_id)} || status=$?",
        f'if [ "$status" -ne 0 ] && [ -f "$run_dir/{COMPLETE}" ]; then',
        '  echo "msmoe: the run finished; the launcher exited $status after a late signal: job complete"',
        "  status=0",
        "fi",
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="submit msmoe train to SLURM (sbatch; job arrays for sweeps)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (= processes) per node")
    p.add_argument("--time", required=True, help="time limit, e.g. 04:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--cpus-per-task", default="node",
                   help="CPUs for the one task per node that runs torchrun and its processes; 'node' (default): "
                        "all CPUs of a node of the partition (sinfo; 8 per GPU with --dry-run). Threads per "
                        "process: these CPUs over --gpus-per-node, unless OMP_NUM_THREADS is set")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: processes per node without requesting GPUs")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    p.add_argument("--signal-warn", type=int, default=120, help="seconds before the time limit SLURM sends SIGUSR1")
    p.add_argument("--sweep", action="append", default=[], help="key=v1,v2 (repeatable): a job array")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then msmoe train arguments")
    p.set_defaults(func=run_submit)


def run_submit(args) -> int:
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise SubmitError(f"--nodes {args.nodes} and --gpus-per-node {args.gpus_per_node} must be >= 1")
    name, out_dir = _name_and_outdir(train_args)
    points = sweep_points(args.sweep)
    run_dir = os.path.abspath(os.path.join(out_dir, name)) if not args.dry_run else os.path.join(out_dir, name)
    python = sys.executable if not args.dry_run else "python"
    root = ROOT if not args.dry_run else "/path/to/msmoe"
    cpus = resolve_cpus_per_task(str(args.cpus_per_task), args.device, args.gpus_per_node, args.partition,
                                 ask_slurm=not args.dry_run)
    script = render_script(JobScript(name=name, run_dir=run_dir, nodes=args.nodes, procs_per_node=args.gpus_per_node,
                                     time=args.time, partition=args.partition, device=args.device,
                                     train_args=train_args, python=python, root=root, port=args.port,
                                     signal_warn_s=args.signal_warn, cpus_per_task=cpus, points=points,
                                     account=args.account))
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch is not on PATH: run `msmoe submit` on a SLURM login node "
                          "(or use --dry-run to see the script)")
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "submit.sbatch")
    with open(path, "w") as fh:
        fh.write(script)
    proc = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch {path} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    with open(os.path.join(run_dir, "slurm_job_id"), "w") as fh:
        fh.write(job_id + "\n")
    print(f"submitted job {job_id}: {path}")
    print(job_id)
    return 0

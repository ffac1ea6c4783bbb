"""``msmoe train`` and ``msmoe eval``: parse, then call the training job (training/job.py).

  msmoe train --config configs/tiny.yaml                       # one process
  msmoe train --config configs/default.yaml --nproc 2          # starts torchrun itself
  torchrun --nproc_per_node 2 -m launcher.cli train --config configs/default.yaml train.steps=100
  msmoe train --config configs/default.yaml --nproc 2 --resume  # continue from the newest checkpoint
  msmoe eval --run-dir runs/default --nproc 2                       # re-evaluate a finished run

Overrides are dotted ``key=value`` pairs after the options. Rank 0 writes runs/<name>/:
config.yaml, summary.json, report.md and the plots; checkpoints go to runs/<name>/checkpoints.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train (and then evaluate) the ReID MoE model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", default="configs/default.yaml", help="YAML run config")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=50")
    t.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    t.add_argument("--auto-resume", action="store_true",
                   help="continue from the newest checkpoint if there is one, else start (requeued jobs)")
    t.add_argument("--init-from", default=None,
                   help="start from the weights of this checkpoint directory (e.g. made by msmoe convert)")
    t.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step (checkpointed; the schedule still targets train.steps)")
    _common(t)
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="evaluate a run's newest checkpoint (mAP, Rank-k, CMC)")
    e.add_argument("--run-dir", required=True, help="run directory (runs/<name>)")
    e.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run's config")
    e.add_argument("--checkpoint", default=None, help="checkpoint directory (default: <run-dir>/checkpoints)")
    _common(e)
    e.set_defaults(func=run_eval)


def _common(p) -> None:
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine; >1 starts torchrun --standalone for you")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


CPU_FIX = 'CUDA_VISIBLE_DEVICES="" to train on the CPU'


def check_nproc_gpus(nproc: int, count=None) -> None:
    """On a CUDA node (``count`` devices; None: ask torch), ``--nproc`` must not exceed the GPUs;
    without CUDA the processes train on the CPU and any number works."""
    from parallel.devices import check_gpu_count, cuda_device_count

    found = cuda_device_count() if count is None else count
    if found:
        check_gpu_count(nproc, "--nproc", CPU_FIX, found)


def _relaunch(nproc: int) -> int | None:
    """Re-run this command under torchrun when asked for >1 process and not yet launched."""
    from parallel.launchenv import discover_launcher, torchrun_command
    from parallel.threads import threads_per_worker

    if nproc <= 1 or "RANK" in os.environ or discover_launcher() != "single":
        return None
    check_nproc_gpus(nproc)  # before any worker starts
    argv, cleaned, skip = sys.argv[1:], [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            cleaned.append(a)
    # torchrun would set OMP_NUM_THREADS=1 for its workers: give them this machine's share instead, unless set
    env = dict(os.environ)
    if not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(threads_per_worker(0, {**env, "LOCAL_WORLD_SIZE": str(nproc)}))
    return subprocess.call(torchrun_command(nproc, ["-m", "launcher.cli", *cleaned]), env=env)


def run_train(args) -> int:
    code = _relaunch(args.nproc)
    if code is not None:
        return code
    from training import job

    return job.train(job.TrainRequest(config=args.config, overrides=tuple(args.overrides), resume=args.resume,
                                      auto_resume=args.auto_resume, init_from=args.init_from,
                                      stop_at=args.stop_at, progress=not args.no_progress))


def run_eval(args) -> int:
    code = _relaunch(args.nproc)
    if code is not None:
        return code
    from training import job

    return job.evaluate(args.run_dir, tuple(args.overrides), args.checkpoint)

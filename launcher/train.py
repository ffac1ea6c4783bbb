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
import sys
import tempfile

from launcher import worker_errors, worker_exit
from launcher.child import run_child

SHUTDOWN_TIMEOUT_S = 120


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
    t.add_argument("--overwrite", action="store_true",
                   help="start over in a run directory that holds another run's checkpoints (deletes them)")
    t.add_argument("--accept-model-change", action="store_true",
                   help="--resume although the config changes the model (top_k, temperature, ...: the same "
                        "parameter shapes); without it such a resume is refused, naming the fields")
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
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="--progress: the progress bar; --no-progress: one plain line per logging step "
                        "(default: the bar when stdout is a terminal, else the lines)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


CPU_FIX = 'CUDA_VISIBLE_DEVICES="" to train on the CPU'


def check_nproc_gpus(nproc: int, count=None) -> None:
    """On a CUDA node (``count`` devices; None: ask torch), ``--nproc`` must not exceed the GPUs;
    without CUDA the processes train on the CPU and any number works."""
    from parallel.devices import check_gpu_count, cuda_device_count

    found = cuda_device_count() if count is None else count
    if found:
        check_gpu_count(nproc, "--nproc", CPU_FIX, found)


def check_nproc(nproc: int) -> None:
    """``--nproc`` counts processes: 0 or less is refused (it used to run one)."""
    if nproc < 1:
        from launcher.launch import LaunchError

        raise LaunchError(f"--nproc {nproc}: the number of processes on this machine must be >= 1 "
                          "(--nproc 1 runs in this process, --nproc N starts N workers under torchrun)")


def _needs_launch(nproc: int) -> bool:
    """More than one process asked for, and no launcher started this one yet."""
    from parallel.launchenv import discover_launcher

    return nproc > 1 and "RANK" not in os.environ and discover_launcher() == "single"


def _launch(nproc: int) -> int:
    """Re-run this command under torchrun with ``nproc`` workers; signals reach them through it."""
    from launcher.command import msmoe_command
    from parallel.threads import threads_per_worker

    cleaned, skip = [], False
    for a in sys.argv[1:]:
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
    # a stop signal reaches the workers through torchrun, which waits this long for their checkpoint
    options = [f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}"]
    with worker_exit.exits_folder() as exits, tempfile.TemporaryDirectory(prefix="msmoe-worker-errors-") as said:
        env[worker_exit.ENV] = exits  # how each worker ended, past torchrun (launcher/worker_exit.py)
        env[worker_errors.ENV] = said  # a worker's user error, said once (launcher/worker_errors.py)
        done = run_child(msmoe_command(cleaned, nproc=nproc, options=options, runner="launcher.worker_errors"), env)
        code, note = worker_exit.outcome(worker_exit.read(exits), nproc, done.signal, done.code)
    if note:
        print(note, file=sys.stderr, flush=True)
    return code


def progress_choice(flag: bool | None) -> str:
    """--progress / --no-progress / neither -> "bar" / "lines" / "auto" (training/job.py: display_mode)."""
    return "auto" if flag is None else ("bar" if flag else "lines")


def run_train(args) -> int:
    from training import job

    check_nproc(args.nproc)
    req = job.TrainRequest(config=args.config, overrides=tuple(args.overrides), resume=args.resume,
                           auto_resume=args.auto_resume, init_from=args.init_from, stop_at=args.stop_at,
                           progress=progress_choice(args.progress), overwrite=args.overwrite,
                           accept_model_change=args.accept_model_change)
    if _needs_launch(args.nproc):
        check_nproc_gpus(args.nproc)
        job.preflight(req, args.nproc)  # one message and exit 2 here rather than one per worker
        return _launch(args.nproc)
    return job.train(req)


def run_eval(args) -> int:
    from training import job

    check_nproc(args.nproc)
    if _needs_launch(args.nproc):
        check_nproc_gpus(args.nproc)
        return _launch(args.nproc)

    return job.evaluate(args.run_dir, tuple(args.overrides), args.checkpoint)

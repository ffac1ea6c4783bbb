"""``msmoe train`` and ``msmoe eval``.

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
import time

import yaml


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
    if nproc <= 1 or "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
        return None
    check_nproc_gpus(nproc)  # before any worker starts
    argv = sys.argv[1:]
    cleaned, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        cleaned.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "launcher.cli", *cleaned]
    from launcher.threads import threads_per_worker

    # torchrun would set OMP_NUM_THREADS=1 for its workers: give them this machine's share instead, unless set
    env = dict(os.environ)
    if not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(threads_per_worker(0, {**env, "LOCAL_WORLD_SIZE": str(nproc)}))
    return subprocess.call(cmd, env=env)


def _setup_threads(threads: int) -> None:
    """torch threads for this worker: ``train.threads``, else from the environment (launcher/threads.py)."""
    import torch

    from launcher.threads import threads_per_worker

    torch.set_num_threads(threads_per_worker(threads))


def _prepare_data(cfg, world, progress: bool = True) -> None:
    import torch.distributed as dist

    from reid.synth import ensure_synth

    if cfg.data.source == "synth" and world.local_rank == 0:
        made = ensure_synth(cfg.data.path, cfg.data.synth_spec(), progress=world.rank == 0 and progress)
        if made and world.rank == 0:
            print(f"generated the synthetic multi-spectral ReID set in {cfg.data.path}", flush=True)
    if world.world_size > 1:
        dist.barrier()


def run_train(args) -> int:
    code = _relaunch(args.nproc)
    if code is not None:
        return code
    from launcher.submit import COMPLETE
    from launcher.preemption import Preemption, requeue
    from launcher.trainer import Trainer, check_data, write_json
    from parallel.dist import init_distributed
    from reid.config import load_config
    from reid.report import write_report

    preemption = Preemption().install()  # before anything slow: a signal during start-up is kept too

    cfg = load_config(args.config, args.overrides)  # bad config fails here, before any process group
    _setup_threads(cfg.train.threads)
    world = init_distributed(timeout_s=cfg.train.collective_timeout_s)
    _prepare_data(cfg, world, not args.no_progress)
    check_data(cfg)
    t_start = time.perf_counter()
    trainer = Trainer(cfg, world, progress=not args.no_progress, preemption=preemption)
    os.makedirs(cfg.run_dir, exist_ok=True)
    untrained_path = os.path.join(cfg.run_dir, "untrained.json")
    untrained = None
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if (args.auto_resume or restart > 0) and trainer.has_checkpoint():
        args.resume = True  # a requeued job, or an elastic restart after a worker died: continue
    if args.resume:
        step = trainer.resume()
        if world.rank == 0:
            why = f" (elastic restart {restart})" if restart else ""
            print(f"resumed {cfg.name!r} at step {step}{why}", flush=True)
        if os.path.isfile(untrained_path):
            from reid.metrics import RetrievalMetrics
            import json
            import numpy as np

            with open(untrained_path) as fh:
                d = json.load(fh)
            untrained = RetrievalMetrics(d["map"], np.asarray(d["cmc"]), d["num_valid_queries"], d["num_skipped_queries"])
    elif args.init_from:
        step = trainer.load_weights(args.init_from)
        if world.rank == 0:
            print(f"initialised {cfg.name!r} from {args.init_from} (saved at step {step})", flush=True)
    if not args.resume and cfg.eval.untrained:
        untrained, _ = trainer.evaluate()
        if world.rank == 0:
            write_json(untrained_path, untrained.as_dict())
            print(f"untrained model: mAP {untrained.map:.1%}  Rank-1 {untrained.rank(1):.1%}", flush=True)
    if world.rank == 0:
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as fh:
            yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    from launcher.guards import TrainingHalted

    try:
        trainer.train(stop_at=args.stop_at)
    except TrainingHalted as exc:
        if world.rank == 0:
            print(f"msmoe: stopped: {exc}", file=sys.stderr, flush=True)
        return 3
    finally:
        trainer.close()  # the batch prefetch thread, whatever ended the loop
    if trainer.preempted:
        note = requeue(world.rank)
        if world.rank == 0:
            print(f"preempted (signal {preemption.signal}): checkpoint at step {trainer.step} in {trainer.ckpt_dir}"
                  + (f"; {note}" if note else "; continue with --resume"), flush=True)
        return 0
    if trainer.step < cfg.train.steps:
        if world.rank == 0:
            print(f"stopped at step {trainer.step} of {cfg.train.steps}; checkpoint in {trainer.ckpt_dir}; "
                  f"continue with --resume", flush=True)
        return 0
    metrics, q = trainer.evaluate()
    peak_mem = trainer.gather_peak_memory_mb()  # every rank takes part
    if world.rank == 0:
        summary = trainer.summary(metrics, untrained, time.perf_counter() - t_start, peak_mem)
        write_json(os.path.join(cfg.run_dir, "summary.json"), summary)
        write_report(summary, cfg.run_dir, q.fusion_weights)
        base = f"  (untrained {untrained.map:.1%})" if untrained is not None else ""
        print(f"{cfg.name}: mAP {metrics.map:.1%}{base}  Rank-1 {metrics.rank(1):.1%}  Rank-5 {metrics.rank(5):.1%}  "
              f"Rank-10 {metrics.rank(10):.1%}  |  {summary['samples_per_s']:.1f} samples/s", flush=True)
        print(f"report: {os.path.join(cfg.run_dir, 'report.md')}", flush=True)
        if preemption.signal is not None:
            print(f"signal {preemption.signal} arrived after the last step: the run is complete", flush=True)
        with open(os.path.join(cfg.run_dir, COMPLETE), "w") as fh:  # job scripts read it (msmoe submit)
            fh.write(f"{trainer.step}\n")
    return 0


def run_eval(args) -> int:
    code = _relaunch(args.nproc)
    if code is not None:
        return code
    from launcher.trainer import Trainer, write_json
    from parallel.dist import init_distributed
    from reid.config import load_config

    cfg_path = os.path.join(args.run_dir, "config.yaml")
    cfg = load_config(cfg_path, args.overrides)
    _setup_threads(cfg.train.threads)
    world = init_distributed()
    trainer = Trainer(cfg, world, progress=False)
    step = trainer.load_weights(args.checkpoint or os.path.join(args.run_dir, "checkpoints"))
    metrics, _ = trainer.evaluate()
    if world.rank == 0:
        out = {"step": step, **metrics.as_dict()}
        write_json(os.path.join(args.run_dir, "eval.json"), out)
        print(f"{cfg.name} @ step {step}: mAP {metrics.map:.1%}  Rank-1 {metrics.rank(1):.1%}  "
              f"Rank-5 {metrics.rank(5):.1%}  Rank-10 {metrics.rank(10):.1%}", flush=True)
    return 0

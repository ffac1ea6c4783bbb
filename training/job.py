"""A whole run on this rank: config -> threads -> process group -> data -> trainer -> train ->
evaluate -> summary.json, report.md and the COMPLETE marker. ``msmoe train`` and ``msmoe eval``
(launcher/train.py) parse their command line and call :func:`train` / :func:`evaluate`.

Exit codes: 0 finished (also when a stop signal came after the last step: the run completes and
says so), stopped at ``--stop-at`` or preempted under SLURM (with a checkpoint); 128 + the signal
(130 SIGINT, 143 SIGTERM) when a stop signal to any rank stopped training (with a checkpoint);
2 when the final writes fail (training/final_writes.py: the checkpoint is safe, ``--resume``
writes the report); 3 halted by a guard (too many non-finite steps, with a checkpoint).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import yaml

from common.config import ConfigError
from parallel.rank_output import launcher_rank, prefix_rank_output
from training.config import RunConfig, load_config
from training.checkpoint.store import CKPT_DIR
from training.room import check_room, check_writable
from training.metrics.run_log import check_wandb


@dataclass(frozen=True)
class TrainRequest:
    config: str  # YAML run config
    overrides: tuple[str, ...] = ()  # dotted key=value
    resume: bool = False  # continue from the newest complete checkpoint
    auto_resume: bool = False  # resume if there is a checkpoint, else start (requeued jobs)
    init_from: str | None = None  # start from these weights (e.g. made by msmoe convert)
    stop_at: int | None = None  # stop after this step (checkpointed)
    progress: str = "auto"  # "bar", "lines" or "auto": the bar on a terminal, else lines (training/metrics/progress.py)
    overwrite: bool = False  # start over in a run directory that holds another run's checkpoints
    accept_model_change: bool = False  # resume although the config changes the model (same parameter shapes)


def display_mode(progress: str, stream=None) -> str:
    """The rank-0 progress display of a request: "bar" or "lines"; "auto" is the bar when stdout is
    a terminal and one plain line per logging step otherwise (a log file)."""
    if progress == "auto":
        stream = stream if stream is not None else sys.stdout
        return "bar" if stream.isatty() else "lines"
    return progress


def setup_threads(threads: int) -> None:
    """torch threads for this worker: ``train.threads``, else from the environment (parallel/threads.py)."""
    import torch

    from parallel.threads import threads_per_worker

    torch.set_num_threads(threads_per_worker(threads))


def prepare_data(cfg: RunConfig, world, progress: bool = True) -> None:
    """Generate the synthetic set where it is configured and missing (local rank 0 of each node),
    then check that a dataset is there."""
    import torch.distributed as dist

    from reid.data import DataError, read_meta
    from reid.synth import ensure_synth

    problem = None  # a DataError of a generating rank reaches every rank (none is left waiting)
    if cfg.data.source == "synth" and world.local_rank == 0:
        try:
            made = ensure_synth(cfg.data.path, cfg.data.synth_spec(), progress=world.rank == 0 and progress)
            if made and world.rank == 0:
                print(f"generated the synthetic multi-spectral ReID set in {cfg.data.path}", flush=True)
        except DataError as exc:
            problem = str(exc)
    if world.world_size > 1:
        problems: list = [None] * world.world_size
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise DataError(problem)
    if read_meta(cfg.data.path) is None:
        raise DataError(f"no dataset at data.path={cfg.data.path!r}: run `msmoe data synth --out {cfg.data.path}` "
                        "(or import one with `msmoe data rgbnt201`)")


def _say(world, text: str, file=sys.stdout) -> None:
    if world.rank == 0:
        print(text, file=file, flush=True)


def wants_resume(req: TrainRequest, cfg: RunConfig) -> bool:
    """--resume; or --auto-resume / an elastic restart when the run has a checkpoint (read-only)."""
    from training.checkpoint.store import CKPT_DIR, newest_complete

    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    found = newest_complete(os.path.join(cfg.run_dir, CKPT_DIR)) is not None
    return req.resume or ((req.auto_resume or restart > 0) and found)


def check_model_change(req: TrainRequest, cfg: RunConfig, resume: bool) -> None:
    """A resume whose config changes the run's model: refused, naming the fields (training/checkpoint/model_change.py)."""
    from training.checkpoint.model_change import check_resume

    check_resume(cfg, resume, req.accept_model_change, req.config, req.overrides)


def preflight(req: TrainRequest, world_size: int) -> RunConfig:
    """What can be checked before any worker starts (``msmoe train --nproc N`` runs it in the
    launching process): the config, its sizes at this world size, the data, the run directory."""
    from moe.config import expert_sharding_error
    from parallel.launchenv import node_size
    from reid.data import DataError, read_meta
    from reid.synth import synth_needs_writing
    from training import ownership

    cfg = load_config(req.config, list(req.overrides))
    nodes_of = node_size(world_size)  # this launch's node: LOCAL_WORLD_SIZE, else all world_size ranks
    ep_size = cfg.ep_size_at(world_size, nodes_of)  # train.elastic_ep may pick a smaller one
    for experts_field, num_experts in cfg.model.expert_layers.items():
        problem = expert_sharding_error(num_experts, ep_size, world_size, experts_field=experts_field,
                                        ep_field="train.ep_size")
        if problem:
            raise ConfigError(problem)
    if cfg.train.transport == "node_local":
        from parallel.transport import TransportError, node_local_problem

        problem = node_local_problem(ep_size=ep_size, node_size=nodes_of, world_size=world_size,
                                     group_sizes=cfg.model.hierarchical_config().group_sizes)
        if problem:
            raise TransportError(problem)
    if cfg.data.source == "synth":
        synth_needs_writing(cfg.data.path, cfg.data.synth_spec())  # garbage metadata, a folder not msmoe's
    elif read_meta(cfg.data.path) is None:  # garbage metadata raises here
        raise DataError(f"no dataset at data.path={cfg.data.path!r} (data.source=disk): import one with "
                        "`msmoe data rgbnt201`, or use data.source=synth")
    check_wandb(cfg.train.wandb_project)
    check_model_change(req, cfg, wants_resume(req, cfg))
    ownership.check_start(cfg.run_dir, resume=wants_resume(req, cfg), overwrite=req.overwrite)
    ownership.check_unlocked(cfg.run_dir)
    check_writable(cfg.run_dir, os.path.join(cfg.run_dir, CKPT_DIR), cfg.out_dir)
    return cfg


def _own_run_dir(cfg: RunConfig, world, lock, resume: bool, overwrite: bool):
    """Rank 0 takes the lock and claims the directory; every rank learns the outcome (one message)."""
    import torch.distributed as dist

    from training import ownership

    outcome: list = [None, None]  # identity, or the error text
    if world.rank == 0:
        try:
            note = lock.acquire()
            if note:
                print(f"msmoe: {note}", file=sys.stderr, flush=True)
            outcome = [ownership.claim(cfg.run_dir, cfg.name, resume=resume, overwrite=overwrite), None]
        except ownership.RunOwnershipError as exc:
            outcome = [None, str(exc)]
    if world.world_size > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise ownership.RunOwnershipError(outcome[1])
    return outcome[0]


def train(req: TrainRequest) -> int:
    from parallel.dist import init_distributed
    from training import ownership
    from training.faults import FaultPlan
    from training.preemption import Preemption

    preemption = Preemption().install()  # before anything slow: a signal during start-up is kept too
    prefix_rank_output(launcher_rank())  # "[rank N] " before every line of the other ranks, DeepSpeed's too
    cfg = load_config(req.config, list(req.overrides))  # a bad config fails here, before any process group
    check_wandb(cfg.train.wandb_project)
    resume = wants_resume(req, cfg)
    check_model_change(req, cfg, resume)  # before config.yaml is written again
    ownership.check_start(cfg.run_dir, resume=resume, overwrite=req.overwrite)  # every rank alike, read-only
    check_writable(cfg.run_dir, os.path.join(cfg.run_dir, CKPT_DIR), cfg.out_dir)  # before anything is written
    faults = FaultPlan.from_env()
    setup_threads(cfg.train.threads)
    world = init_distributed(timeout_s=cfg.train.collective_timeout_s)
    prefix_rank_output(world.rank)  # mpirun: the rank is known now
    lock = ownership.RunLock(cfg.run_dir)
    try:
        identity = _own_run_dir(cfg, world, lock, resume, req.overwrite)
        prepare_data(cfg, world, display_mode(req.progress) == "bar")
        return _train(req, cfg, world, identity.run_id, resume, preemption, faults)
    finally:
        lock.release()


def _train(req: TrainRequest, cfg: RunConfig, world, run_id: str, resume: bool, preemption, faults) -> int:
    from training.guards import TrainingHalted
    from training.trainer import Trainer

    t_start = time.perf_counter()
    trainer = Trainer(cfg, world, display=display_mode(req.progress), preemption=preemption, faults=faults,
                      run_id=run_id)
    untrained = _start(req, cfg, world, trainer, resume)
    try:
        trainer.train(stop_at=req.stop_at)
    except TrainingHalted as exc:
        _say(world, f"msmoe: stopped: {exc}", file=sys.stderr)
        return 3
    finally:
        trainer.close()  # the batch prefetch thread, whatever ended the loop
    code = _stopped_early(cfg, world, trainer)
    if code is not None:
        return code
    return _finish(req, cfg, world, trainer, untrained, preemption, faults, t_start)


def _start(req: TrainRequest, cfg: RunConfig, world, trainer, resume: bool):
    """Before the first step: the resume (or the weights of --init-from), the room check, the untrained
    model's evaluation and config.yaml. Returns the untrained model's metrics (None if not evaluated)."""
    from reid.metrics import RetrievalMetrics
    from training.metrics.records import write_json

    untrained_path = os.path.join(cfg.run_dir, "untrained.json")
    untrained = None
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if resume:
        step = trainer.resume()
        notes = [n for n in (trainer.checkpointer.resharded, f"elastic restart {restart}" if restart else None) if n]
        _say(world, f"resumed {cfg.name!r} at step {step}" + (f" ({'; '.join(notes)})" if notes else ""))
        if os.path.isfile(untrained_path):
            with open(untrained_path) as fh:
                untrained = RetrievalMetrics.from_dict(json.load(fh))
    elif req.init_from:
        step = trainer.load_weights(req.init_from)
        _say(world, f"initialised {cfg.name!r} from {req.init_from} (saved at step {step})")
    if trainer.step < (cfg.train.steps if req.stop_at is None else min(cfg.train.steps, req.stop_at)):
        check_room(trainer)  # steps to train, so a checkpoint to write: one fits, before any evaluation or step
    if not resume and cfg.eval.untrained:
        untrained, _ = trainer.evaluator.retrieval()
        if world.rank == 0:
            write_json(untrained_path, untrained.as_dict())
        _say(world, f"untrained model: mAP {untrained.map:.1%}  Rank-1 {untrained.rank(1):.1%}")
    if world.rank == 0:
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as fh:
            yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    return untrained


def _stopped_early(cfg: RunConfig, world, trainer) -> int | None:
    """The exit code of a training that stopped before ``train.steps`` (preempted, a stop signal,
    --stop-at; a checkpoint was written); None when it trained to the end."""
    from training.preemption import interrupted_exit_code, requeue, signal_name, under_slurm

    stop = trainer.stop_signal  # agreed by every rank, whichever rank(s) the signal reached
    if trainer.preempted and under_slurm():
        note = requeue(world.rank)
        _say(world, f"preempted (signal {stop}): checkpoint at step {trainer.step} in {trainer.ckpt_dir}"
                    + (f"; {note}" if note else ""))
        return 0
    if trainer.preempted:
        _say(world, f"interrupted by {signal_name(stop)} after step {trainer.step}: checkpoint in {trainer.ckpt_dir}; "
                    f"continue with --resume", file=sys.stderr)
        return interrupted_exit_code(stop)
    if trainer.step < cfg.train.steps:
        _say(world, f"stopped at step {trainer.step} of {cfg.train.steps}; checkpoint in {trainer.ckpt_dir}; "
                    f"continue with --resume")
        return 0
    return None


def _finish(req: TrainRequest, cfg: RunConfig, world, trainer, untrained, preemption, faults, t_start: float) -> int:
    """After the last step: evaluation, memory and model cost on every rank; rank 0 writes summary.json,
    the report and COMPLETE (training/final_writes.py), all ranks agree on the outcome."""
    from training import final_writes
    from training.collect import gathered
    from training.preemption import agreed_signal, signal_flags, signal_name
    from training.report.model_cost import gather_peak_memory_mb, run_cost
    from training.report.summary import FinalEvaluation, build_summary

    faults.fill_disk(trainer.step, world.rank, os.path.dirname(cfg.run_dir))  # MSMOE_FAULT=fill_disk@N
    metrics, q = trainer.evaluator.retrieval()
    peak_mem = gather_peak_memory_mb(world.device, world.rank, world.world_size)  # training's peak: before the cost
    cost = run_cost(trainer.model, trainer.moe_layers, trainer.groups.ep_size, trainer.evaluator.query_batch(),
                    world.world_size, world.device)
    missing = trainer.evaluator.missing_modalities() if cfg.eval.missing_modalities else None
    # a stop signal to any rank after the last step's all-reduce: every rank learns of it here
    late = agreed_signal([sum(n) for n in zip(*gathered(signal_flags(preemption.signal), world.world_size,
                                                         "stop signal"))])
    error = None
    if world.rank == 0:
        final = FinalEvaluation(metrics, untrained, time.perf_counter() - t_start, peak_mem, cost)
        summary = {**build_summary(trainer.outcome(), final), "missing_modality": missing}
        base = f"  (untrained {untrained.map:.1%})" if untrained is not None else ""
        print(f"{cfg.name}: mAP {metrics.map:.1%}{base}  Rank-1 {metrics.rank(1):.1%}  Rank-5 {metrics.rank(5):.1%}  "
              f"Rank-10 {metrics.rank(10):.1%}  |  {summary['samples_per_s']:.1f} samples/s", flush=True)
        try:
            final_writes.write_outputs(cfg.run_dir, summary, q.fusion_weights, trainer.step)
        except OSError as exc:
            error = final_writes.failure(exc, cfg.run_dir)
    final_writes.agree(error, world.world_size, trainer.step, cfg.run_dir, trainer.ckpt_dir,
                       final_writes.resume_command(req.config, req.overrides, world.world_size))
    _say(world, f"report: {os.path.join(cfg.run_dir, 'report.md')}")
    if late is not None:
        _say(world, f"{signal_name(late)} arrived after the last step, during the final evaluation: the run is "
                    "complete (checkpoint and report written), exit 0")
    return 0


def evaluate(run_dir: str, overrides: tuple[str, ...] = (), checkpoint_dir: str | None = None) -> int:
    """Re-evaluate a run's checkpoint (default: its newest) with the run's config; writes eval.json."""
    from parallel.dist import init_distributed
    from training.metrics.records import write_json
    from training.trainer import Trainer

    prefix_rank_output(launcher_rank())
    cfg = load_config(os.path.join(run_dir, "config.yaml"), list(overrides))
    setup_threads(cfg.train.threads)
    world = init_distributed()
    prefix_rank_output(world.rank)
    trainer = Trainer(cfg, world)
    step = trainer.load_weights(checkpoint_dir or os.path.join(run_dir, "checkpoints"), what="eval")
    metrics, _ = trainer.evaluator.retrieval()
    if world.rank == 0:
        write_json(os.path.join(run_dir, "eval.json"), {"step": step, "modalities": list(cfg.eval.modalities),
                                                       **metrics.as_dict()})
        print(f"{cfg.name} @ step {step}: mAP {metrics.map:.1%}  Rank-1 {metrics.rank(1):.1%}  "
              f"Rank-5 {metrics.rank(5):.1%}  Rank-10 {metrics.rank(10):.1%}", flush=True)
    return 0

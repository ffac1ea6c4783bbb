"""The training job: data -> expert-parallel ReID model in a DeepSpeed engine -> evaluation.

Determinism (what makes ``--resume`` exact): the batch of step s comes from (seed, s) alone
(:class:`reid.data.PKSampler`), the learning rate is a function of s, and the torch RNG (dropout,
router noise) is reseeded from (seed, s, rank) at the start of every step. A run stopped after
step N and resumed from its checkpoint therefore computes the same steps N+1.. as one that never
stopped.

Preemption: SIGUSR1 (SLURM's warning, ``--signal=USR1@T``) or SIGTERM sets a flag; at the end of
the step every rank learns of it (it rides on the per-step all-reduce), all stop after the *same*
step and save a checkpoint; the caller requeues the job (training/preemption.py).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time

import numpy as np
import torch
import torch.distributed as dist

from common import compat
from moe.timing import WallTimer
from parallel.all_to_all import CommCounter, collective
from parallel.dist import WorldInfo
from parallel.ds_moe import shard_moe_layers
from parallel.engine import build_engine, sync_batchnorm_stats
from parallel.groups import ParallelGroups
from reid.data import MODALITIES, Batch, PKSampler, check_image_size, dataset_summary, load_splits
from reid.losses import LossParts, reid_loss
from reid.model import ReIDModel
from reid.prefetch import BatchFeed
from training import checkpoint, elastic
from training.config import RunConfig
from training.evaluate import eval_batch, retrieval
from training.faults import NO_FAULTS, FaultPlan
from training.guards import BadStepGuard, CollapseDetector, TrainingHalted
from training.model_cost import inference_cost, parameter_counts
from training.metrics import (
    IntervalStats, RunProgress, StageClock, StepResult, a2a_per_step, build_summary, interval_record,
)
from training.preemption import Preemption, agreed_signal, signal_flags
from training.profiling import StepProfiler
from training.progress import ProgressMode, build_progress
from training.run_log import NoRunLog, RunLog

WARMUP_STEPS = 3  # first steps left out of throughput and stage timing (first calls, allocator)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**31 - 1)


class _Span:
    """Where the current logging interval began: step, wall clock, all-to-all byte counters."""

    def __init__(self, step: int, t0: float, comm: CommCounter) -> None:
        self.step, self.t0 = step, t0
        self.a2a_total, self.a2a_offrank = comm.total_bytes, comm.offrank_bytes


class Trainer:
    """Builds everything once; ``train`` runs the steps; ``evaluate`` the retrieval metrics."""

    def __init__(self, cfg: RunConfig, world: WorldInfo, display: ProgressMode = "off",
                 preemption: Preemption | None = None, faults: FaultPlan = NO_FAULTS, run_id: str = ""):
        self.cfg, self.world, self.faults, self.run_id = cfg, world, faults, run_id
        self.preemption = preemption if preemption is not None else Preemption()
        self.rank, self.world_size, self.device = world.rank, world.world_size, world.device
        self.display: ProgressMode = display if self.rank == 0 else "off"  # training/progress.py
        self.ckpt_dir = os.path.join(cfg.run_dir, checkpoint.CKPT_DIR)
        tc = cfg.train

        self.splits = load_splits(cfg.data.path)
        check_image_size(self.splits, cfg.data.path, cfg.model.stem_stride)
        self.data_summary = dataset_summary(self.splits)
        train_pids = np.asarray(self.splits["train"]["pid"])
        self.num_classes = len(np.unique(train_pids))
        self.sampler = PKSampler(train_pids, tc.p, tc.k, self.world_size, self.rank, cfg.seed)
        self.dtype = torch.bfloat16 if tc.precision == "bf16" else torch.float32
        self.feed = BatchFeed(self.splits["train"], self.sampler, self.device, self.dtype, tc.prefetch, end=tc.steps)

        self.groups = ParallelGroups.build(tc.ep_size_for(self.world_size, cfg.model.experts_gcd),
                                           cfg.model.num_experts, timeout_s=tc.collective_timeout_s)
        self.timer, self.comm = WallTimer(), CommCounter()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank, for every EP size
        model = ReIDModel(cfg.model, num_classes=self.num_classes)
        self.moe_layers = shard_moe_layers(model, self.groups, self.comm, self.timer)
        self.moe_engine = build_engine(
            model.to(self.device), self.groups, tc.deepspeed_config(self.world_size),
            lambda groups: torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay),
            weight_decay=tc.weight_decay)
        self.engine = self.moe_engine.engine
        self.model = self.engine.module

        self.step = 0
        self.progress = RunProgress()
        self.bad_steps = BadStepGuard(tc.max_bad_steps)
        self.layer_names = [f"block{b}" for b in cfg.model.moe_blocks]
        self.collapse = CollapseDetector(tc.collapse_share, tc.collapse_intervals, self.layer_names)
        self.last_stages: dict[str, float] = {}  # seconds per stage of the last sampled step
        self.a2a_per_step: dict = {}
        self.preempted = False
        self.stop_signal: int | None = None  # the signal that stopped the loop, the same on every rank
        self.resharded: str | None = None  # set by resume: "resharded EP 4 -> 2"

    # ------------------------------------------------------------------ train
    def train_step(self, s: int, interval: IntervalStats, sampled: bool = False) -> StepResult:
        """One optimizer step (step ``s``): batch, forward, loss, backward, then - after the step's one
        all-reduce (finiteness, losses, preemption: the one host read) - the update or a skip.

        Routing statistics are added to ``interval`` on the device. ``sampled`` measures the stage
        breakdown (synchronising a GPU between stages); other steps wait for the device only for
        the all-to-all split sizes (one per dispatching layer) and the host read above."""
        torch.manual_seed(step_seed(self.cfg.seed, s, self.rank))
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self.cfg.train.lr_at(s)
        clock = StageClock(self.device, sampled, self.timer)
        batch, labels = self.batch(s)
        clock.mark("data")
        out = self.engine(batch)
        loss = self.loss(out, labels, s)
        clock.mark("forward")
        self.engine.backward(loss.total)  # every rank, always: the backward's all-to-alls pair up
        clock.mark("backward")
        result = self._reduce_step(loss, interval.add(out))
        if result.bad:  # skipped on every rank alike: no update, gradients dropped
            self.engine.zero_grad()
        else:
            self.moe_engine.clip_gradients()
            self.engine.step()
        sync_batchnorm_stats(self.model, self.groups)
        clock.mark("optimizer")
        stages = clock.measured()
        self.progress.add_stages(stages)
        if stages:
            self.last_stages = stages
        return result

    def train(self, stop_at: int | None = None) -> None:
        """Steps until ``train.steps`` (or ``stop_at``), a preemption, or too many bad steps."""
        tc = self.cfg.train
        end = tc.steps if stop_at is None else min(tc.steps, stop_at)
        interval, first_step = IntervalStats(), self.step
        bar = build_progress(self.display, self.cfg.name, self.step, tc.steps)
        log = self._open_run_log()
        profiler = StepProfiler(tc.profile_steps, os.path.join(self.cfg.run_dir, "profile"), self.rank, self.device)
        self.comm.reset()
        self.engine.train()
        span = _Span(self.step, time.perf_counter(), self.comm)  # the logging interval so far
        try:
            while self.step < end:
                s = self.step
                self.faults.at_step_start(s, self.rank)
                profiler.before(s)
                t0 = time.perf_counter()
                r = self.train_step(s, interval, self._sampled(s))
                self._record(s, r, time.perf_counter() - t0)
                profiler.after(s)
                if self.step % tc.log_every == 0 or self.step == end:
                    record = self._log_interval(interval, r, span)
                    interval, span = IntervalStats(), _Span(self.step, time.perf_counter(), self.comm)
                    self.last_stages = {}  # the next interval's sampled step fills it
                    if record is not None:
                        log.write(record)
                        bar.logged(record)
                if self.step % tc.ckpt_every == 0 and self.step < end:
                    self.save()
                bar.update(r, self.progress.samples_per_s(tc.p * tc.k))
                if r.preempt:  # some rank was signalled: every rank stops after this same step
                    self.preempted, self.stop_signal = True, r.preempt
                    break
        finally:
            profiler.close()
            bar.close()
            log.close()
        self.timer.active = False  # evaluation is not timed
        # none measured when no step ran here (a resume that only writes the report): not zeros
        self.a2a_per_step = a2a_per_step(self.comm, self.step - first_step) if self.step > first_step else {}
        if self.step > first_step or not checkpoint.is_complete(self.ckpt_dir, self.step):
            self.save()  # nothing trained since a resume at this step: its checkpoint stays as it is

    # ------------------------------------------------------- parts of a step
    def batch(self, step: int) -> tuple[Batch, torch.Tensor]:
        """Step ``step``'s batch and labels on the device, made ahead by the prefetch thread
        (``train.prefetch``; reid/prefetch.py). Asking for another step than the next one (a resume)
        restarts the thread there."""
        sb = self.feed.get(step)
        return sb.batch, sb.labels

    def loss(self, out, labels: torch.Tensor, s: int) -> LossParts:
        tc = self.cfg.train
        parts = reid_loss(out.logits, out.feat, labels, out.aux_loss, label_smoothing=tc.label_smoothing,
                          margin=tc.triplet_margin, triplet_weight=tc.triplet_weight)
        if self.faults.fires("nan_loss", s, self.rank):
            parts = dataclasses.replace(parts, total=parts.total * float("nan"))
        return parts

    def _sampled(self, s: int) -> bool:
        """Whether step ``s`` measures its stage breakdown: one step per logging interval."""
        tc = self.cfg.train
        return tc.stage_timing == "sampled" and s >= WARMUP_STEPS and (s - WARMUP_STEPS) % tc.log_every == 0

    def _reduce_step(self, parts: LossParts, active: torch.Tensor) -> StepResult:
        """The step's one all-reduce and one host read: non-finite flag (loss or any local gradient),
        loss parts, active experts and the preemption flag, all summed over ranks at once."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norms = torch.stack([parts.total.detach().float().reshape(()),
                             *[n.float() for n in compat.foreach_norm(grads)]]) if grads \
            else parts.total.detach().float().reshape(1)
        bad = (~torch.isfinite(norms).all()).double()
        flags = torch.tensor(signal_flags(self.preemption.signal), dtype=torch.float64, device=bad.device)
        vec = torch.cat([torch.stack([bad, parts.total.detach().double(), parts.id.double(), parts.triplet.double(),
                                      parts.aux.double(), active.double()]), flags])
        vec = vec.to(self.device)  # NCCL reduces device tensors only
        if self.world_size > 1:
            collective("all-reduce of the step's losses, finiteness and preemption flag", dist.all_reduce, vec,
                       host_reads=True)
        bad_n, total, ce, tri, aux, act, *signals = vec.tolist()
        w = self.world_size
        return StepResult(bad_n > 0, total / w, ce / w, tri / w, aux / w, act / w, agreed_signal(signals) or 0)

    def _record(self, s: int, r: StepResult, seconds: float) -> None:
        """After step ``s``: the skip guard, the history, the clocks (warm-up steps are not timed)."""
        if self.bad_steps.record(s, r.bad):
            self.step = s + 1
            self.save()
            raise TrainingHalted(
                f"{self.bad_steps.in_a_row} steps in a row (up to step {s + 1}) had a non-finite loss or "
                f"gradients (train.max_bad_steps={self.cfg.train.max_bad_steps}); stopped with a checkpoint at "
                f"step {self.step} in {self.ckpt_dir}. Lower train.lr, check the data for NaN pixels, or "
                "use precision=fp32")
        if r.bad and self.rank == 0:
            print(f"step {s + 1}: non-finite loss or gradients on some rank: step skipped "
                  f"({self.bad_steps.in_a_row} in a row, {len(self.bad_steps.skipped)} in all)", flush=True)
        self.progress.record(r, self.cfg.train.lr_at(s), seconds if s >= WARMUP_STEPS else None)
        self.step = s + 1

    def _open_run_log(self):
        """Rank 0's metrics.jsonl / TensorBoard / W&B writers (training/run_log.py), continuing from this step."""
        if self.rank != 0:
            return NoRunLog()
        tc = self.cfg.train
        return RunLog(self.cfg.run_dir, self.step, wandb_project=tc.wandb_project, run_name=self.cfg.name,
                      run_id=self.run_id, config=self.cfg.to_dict())

    def _log_interval(self, interval: IntervalStats, last: StepResult, span: "_Span") -> dict | None:
        """A logging step: the interval's routing statistics, summed over ranks, read on the host; returns
        the step's metrics record (training/metrics.py: interval_record)."""
        if interval.steps == 0:
            return None
        reduced = interval.packed().to(self.device)
        if self.world_size > 1:
            collective("all-reduce of the interval's routing statistics", dist.all_reduce, reduced, host_reads=True)
        got = interval.unpack(reduced.cpu(), self.world_size)
        h = self.progress.history
        h.load_steps.append(self.step)
        h.load.append(got["load"])
        h.fusion_load.append(got["fusion"])
        h.dropped.append(float(np.mean(got["dropped"])) if got["dropped"] else 0.0)
        h.active.append(got["active"])
        for msg in self.collapse.update(self.step, h.load[-1]):
            self.progress.warnings.append(msg)
            if self.rank == 0:
                print(f"warning: {msg}", flush=True)
        tc = self.cfg.train
        return interval_record(
            step=self.step, result=last, lr=h.lr[-1], seconds=time.perf_counter() - span.t0,
            steps=self.step - span.step, total_steps=tc.steps, samples_per_step=tc.p * tc.k,
            stages_s=self.last_stages,
            layer_names=self.layer_names, load=got["load"], dropped=got["dropped"], active=got["active"],
            a2a_bytes={"total": self.comm.total_bytes - span.a2a_total,
                       "offrank": self.comm.offrank_bytes - span.a2a_offrank})

    # ------------------------------------------------------------- checkpoint
    def save(self) -> None:
        """Atomic: written by every rank, then committed by rank 0 (see training/checkpoint.py)."""
        client = {"step": self.step, "run_id": self.run_id, **self.progress.state_dict(),
                  "skipped_steps": self.bad_steps.skipped, "collapse_events": self.collapse.events,
                  "ep_size": self.groups.ep_size, "world_size": self.world_size}  # the layout (training/elastic.py)
        layout = {"ep_size": self.groups.ep_size, "world_size": self.world_size,
                  "zero_stage": self.cfg.train.zero_stage}
        checkpoint.save(self.engine, self.ckpt_dir, self.step, client, self.cfg.train.keep_last, self.rank,
                        self.world_size, self.faults, run_id=self.run_id, layout=layout)

    def has_checkpoint(self) -> bool:
        return checkpoint.newest_complete(self.ckpt_dir) is not None

    def resume(self) -> int:
        """Load the newest complete checkpoint whose files match its manifest (all ranks agree on it
        before loading), resharded if it was saved at another EP size (``self.resharded`` then says
        so); returns the step it continues from."""
        run = elastic.Layout(self.groups.ep_size, self.world_size, self.cfg.train.zero_stage)
        reshard = elastic.ElasticResume(run, self.rank)
        client = checkpoint.resume(self.engine, self.ckpt_dir, self.cfg.name, rank=self.rank,
                                   world_size=self.world_size, prepare=reshard.prepare, loader=reshard.load)
        self.resharded = reshard.note
        self.step = int(client["step"])
        self.progress = RunProgress.from_state_dict(client)
        self.bad_steps.skipped = list(client.get("skipped_steps", []))
        self.collapse.events = list(client.get("collapse_events", []))
        return self.step

    def load_weights(self, ckpt_dir: str, what: str = "--init-from") -> int:
        """Weights only (e.g. a checkpoint converted to another expert count) of the newest verified
        step; training still starts at step 0. Returns the step it was saved at (0 if unknown)."""
        step, _ = checkpoint.load_weights(self.engine, ckpt_dir, self.cfg.name, self.rank, self.world_size, what)
        return step

    def close(self) -> None:
        """Stop the prefetch thread (also after an error or a preemption; safe to call twice)."""
        self.feed.close()

    # ------------------------------------------------------------------ eval
    def evaluate(self, modalities: tuple[str, ...] | None = None):
        """Retrieval metrics with ``modalities`` present (default: ``eval.modalities``)."""
        ec = self.cfg.eval
        return retrieval(self.model, self.splits, ec.batch_size, self.rank, self.world_size, self.device,
                         ec.max_rank, self.dtype, modalities or ec.modalities)

    def evaluate_missing_modalities(self) -> dict:
        """mAP / Rank-1 with each modality absent in turn (a standard RGBNT201 evaluation)."""
        out = {}
        for absent in MODALITIES:
            metrics, _ = self.evaluate(tuple(m for m in MODALITIES if m != absent))
            out[f"without_{absent}"] = {"map": metrics.map, "rank1": metrics.rank(1)}
        return out

    def model_cost(self) -> dict:
        """Parameters, FLOPs and latency per image at inference (training/model_cost.py); every rank."""
        inner = [layer.deepspeed_moe for layer in self.moe_layers]
        batch = eval_batch(self.splits["query"], self.cfg.eval.batch_size, self.rank, self.world_size, self.device,
                           self.dtype)
        return {"parameters": parameter_counts(self.model, inner, self.groups.ep_size),
                "inference": inference_cost(self.model, batch, self.world_size, self.device)}

    def gather_peak_memory_mb(self) -> list[float]:
        """Peak memory of every rank (CUDA: max allocated; CPU: max RSS), gathered to all ranks."""
        if self.device.type == "cuda":
            mine = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        t[self.rank] = mine
        if self.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def summary(self, metrics, untrained, elapsed_s: float, peak_mem_mb: list[float] | None = None,
                model_cost: dict | None = None) -> dict:
        return build_summary(model_cost=model_cost, cfg=self.cfg, world=self.world, ep_size=self.groups.ep_size,
                             moe_layers=len(self.cfg.model.moe_blocks), steps=self.step, progress=self.progress,
                             skipped_steps=self.bad_steps.skipped, collapse_events=self.collapse.events,
                             a2a_per_step=self.a2a_per_step, metrics=metrics, untrained=untrained,
                             elapsed_s=elapsed_s, peak_mem_mb=peak_mem_mb, data_summary=self.data_summary)

"""The trainer: builds data, model and DeepSpeed engine once, runs the steps, and wires the components
(metrics processor, checkpointer, evaluator): data -> expert-parallel ReID model -> evaluation.

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
import time

import numpy as np
import torch
import torch.distributed as dist

from common import compat
from moe.experts import experts_on_meta
from moe.timing import WallTimer
from parallel.all_to_all import collective
from parallel.dist import WorldInfo
from parallel.ds_moe import shard_moe_layers
from parallel.engine import build_engine, sync_batchnorm_stats
from parallel.groups import ParallelGroups
from parallel.launchenv import node_size
from parallel.transport import Transport
from reid.data import Batch, PKSampler, check_image_size, dataset_summary, load_splits
from reid.losses import LossParts, reid_loss
from reid.model import ReIDModel
from reid.prefetch import BatchFeed
from training.checkpoint import store
from training.checkpoint.checkpointer import Checkpointer
from training.checkpoint.layout import Layout
from training.config import RunConfig
from training.evaluate import Evaluator
from training.faults import NO_FAULTS, FaultPlan
from training.guards import BadStepGuard, TrainingHalted
from training.metrics.clock import StageClock
from training.metrics.interval import IntervalStats, a2a_per_step
from training.metrics.processor import MetricsProcessor
from training.metrics.progress import ProgressMode
from training.metrics.records import StepResult
from training.preemption import Preemption, agreed_signal, signal_flags
from training.profiling import StepProfiler
from training.report.summary import TrainedRun


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**31 - 1)


class Trainer:
    """Builds everything once and wires the components: ``train_step`` is one step, ``train`` the
    loop; ``metrics`` (training/metrics/processor.py) gets every step's result, ``checkpointer``
    (training/checkpoint/checkpointer.py) saves and resumes, ``evaluator`` (training/evaluate.py)
    measures retrieval."""

    def __init__(self, cfg: RunConfig, world: WorldInfo, display: ProgressMode = "off",
                 preemption: Preemption | None = None, faults: FaultPlan = NO_FAULTS, run_id: str = ""):
        self.cfg, self.world, self.faults, self.run_id = cfg, world, faults, run_id
        self.preemption = preemption if preemption is not None else Preemption()
        self.rank, self.world_size, self.device = world.rank, world.world_size, world.device
        self.ckpt_dir = os.path.join(cfg.run_dir, store.CKPT_DIR)
        self._build_data()
        self._build_model()
        tc = cfg.train
        self.step = 0
        self.bad_steps = BadStepGuard(tc.max_bad_steps)
        self.metrics = MetricsProcessor(cfg, rank=self.rank, world_size=self.world_size, device=self.device,
                                        comm=self.comm, display=display, run_id=run_id)
        layout = Layout(self.groups.ep_size, self.world_size, tc.zero_stage)  # training/checkpoint/elastic.py
        self.checkpointer = Checkpointer(self.engine, self.ckpt_dir, every=tc.ckpt_every, keep_last=tc.keep_last,
                                         layout=layout, rank=self.rank, state=self._client_state, faults=faults,
                                         run_id=run_id)
        self.evaluator = Evaluator(self.model, self.splits, cfg.eval, self.rank, self.world_size, self.device,
                                   self.dtype)
        self.a2a_per_step: dict = {}
        self.preempted = False
        self.stop_signal: int | None = None  # the signal that stopped the loop, the same on every rank

    def _build_data(self) -> None:
        """Splits, the PK sampler of this rank and the prefetch thread (reid/data.py, reid/prefetch.py)."""
        cfg, tc = self.cfg, self.cfg.train
        self.splits = load_splits(cfg.data.path)
        check_image_size(self.splits, cfg.data.path, cfg.model.stem_stride)
        self.data_summary = dataset_summary(self.splits)
        train_pids = np.asarray(self.splits["train"]["pid"])
        self.num_classes = len(np.unique(train_pids))
        self.sampler = PKSampler(train_pids, tc.p, tc.k, self.world_size, self.rank, cfg.seed)
        self.dtype = torch.bfloat16 if tc.precision == "bf16" else torch.float32
        self.feed = BatchFeed(self.splits["train"], self.sampler, self.device, self.dtype, tc.prefetch, end=tc.steps)

    def _build_model(self) -> None:
        """Process groups, the model with its MoE layers sharded over EP ranks, the DeepSpeed engine."""
        cfg, tc = self.cfg, self.cfg.train
        self.groups = ParallelGroups.build(cfg.ep_size_at(self.world_size, node_size(self.world_size)),
                                           cfg.model.num_experts, timeout_s=tc.collective_timeout_s)
        # the hierarchical blocks' transport and the nodes, once, beside the groups (parallel/transport.py)
        self.transport = Transport.build(tc.transport, self.groups, node_size(self.world_size), self.world.local_rank)
        self.timer, self.comm = WallTimer(), self.transport.counter()  # cross-node bytes counted with its nodes
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank, for every EP size
        with experts_on_meta():  # sharded construction: each rank builds only its own experts
            model = ReIDModel(cfg.model, num_classes=self.num_classes)
        self.moe_layers = shard_moe_layers(model, self.groups, self.comm, self.timer, self.transport)
        self.moe_engine = build_engine(
            model.to(self.device), self.groups, tc.deepspeed_config(self.world_size),
            lambda groups: torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay),
            weight_decay=tc.weight_decay)
        self.engine = self.moe_engine.engine
        self.model = self.engine.module

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
        self.metrics.add_stages(clock.measured())
        return result

    def train(self, stop_at: int | None = None) -> None:
        """Steps until ``train.steps`` (or ``stop_at``), a preemption, or too many bad steps."""
        end = self.cfg.train.steps if stop_at is None else min(self.cfg.train.steps, stop_at)
        first_step = self.step
        profiler = StepProfiler(self.cfg.train.profile_steps, os.path.join(self.cfg.run_dir, "profile"), self.rank,
                                self.device)
        self.comm.reset()
        self.engine.train()
        self.metrics.open(self.step, end)
        try:
            while self.step < end:
                s = self.step
                self.faults.at_step_start(s, self.rank)
                profiler.before(s)
                t0 = time.perf_counter()
                r = self.train_step(s, self.metrics.interval, self.metrics.sampled(s))
                self._count(s, r)
                profiler.after(s)
                self.metrics.step_done(s, r, time.perf_counter() - t0)
                self.checkpointer.maybe_save(self.step, end)
                if r.preempt:  # some rank was signalled: every rank stops after this same step
                    self.preempted, self.stop_signal = True, r.preempt
                    break
        finally:
            profiler.close()
            self.metrics.close()
        self.timer.active = False  # evaluation is not timed
        # none measured when no step ran here (a resume that only writes the report): not zeros
        self.a2a_per_step = a2a_per_step(self.comm, self.step - first_step) if self.step > first_step else {}
        self.checkpointer.final_save(self.step, trained=self.step > first_step)

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

    def _count(self, s: int, r: StepResult) -> None:
        """After step ``s``: the skip guard (too many bad steps in a row: a checkpoint, then a halt)."""
        if self.bad_steps.record(s, r.bad):
            self.step = s + 1
            self.checkpointer.save(self.step)
            raise TrainingHalted(
                f"{self.bad_steps.in_a_row} steps in a row (up to step {s + 1}) had a non-finite loss or "
                f"gradients (train.max_bad_steps={self.cfg.train.max_bad_steps}); stopped with a checkpoint at "
                f"step {self.step} in {self.ckpt_dir}. Lower train.lr, check the data for NaN pixels, or "
                "use precision=fp32")
        if r.bad and self.rank == 0:
            print(f"step {s + 1}: non-finite loss or gradients on some rank: step skipped "
                  f"({self.bad_steps.in_a_row} in a row, {len(self.bad_steps.skipped)} in all)", flush=True)
        self.step = s + 1

    # ------------------------------------------------------------- checkpoint
    def _client_state(self) -> dict:
        """What a checkpoint keeps of the run besides the weights and its layout."""
        return {**self.metrics.state_dict(), "skipped_steps": self.bad_steps.skipped}

    def resume(self) -> int:
        """Continue from the newest verified checkpoint (training/checkpoint/checkpointer.py); returns
        the step it continues from."""
        client = self.checkpointer.resume(self.cfg.name)
        self.step = int(client["step"])
        self.metrics.load_state_dict(client)
        self.bad_steps.skipped = list(client.get("skipped_steps", []))
        return self.step

    def load_weights(self, ckpt_dir: str, what: str = "--init-from") -> int:
        """Weights only (e.g. a checkpoint converted to another expert count) of the newest verified
        step; training still starts at step 0. Returns the step it was saved at (0 if unknown)."""
        return self.checkpointer.load_weights(ckpt_dir, self.cfg.name, what)

    def close(self) -> None:
        """Stop the prefetch thread (also after an error or a preemption; safe to call twice)."""
        self.feed.close()

    def outcome(self) -> TrainedRun:
        """What the training left, for summary.json (training/report/summary.py)."""
        return TrainedRun(cfg=self.cfg, world=self.world, ep_size=self.groups.ep_size, steps=self.step,
                          progress=self.metrics.progress, skipped_steps=self.bad_steps.skipped,
                          collapse_events=self.metrics.collapse.events, a2a_per_step=self.a2a_per_step,
                          transport=self.transport.kind, nodes=self.transport.nodes,
                          data_summary=self.data_summary)

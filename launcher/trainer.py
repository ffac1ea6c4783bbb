"""The training job: data -> expert-parallel ReID model in a DeepSpeed engine -> evaluation -> report.

Determinism (what makes ``--resume`` exact): the batch of step s comes from (seed, s) alone
(:class:`reid.data.PKSampler`), the learning rate is a function of s, and the torch RNG (dropout,
router noise) is reseeded from (seed, s, rank) at the start of every step. A run stopped after
step N and resumed from its checkpoint therefore computes the same steps N+1.. as one that never
stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from launcher import checkpoints, faults
from launcher.evaluate import retrieval
from launcher.metrics import History, IntervalStats, StepResult
from launcher.preemption import Preemption
from launcher.guards import BadStepGuard, CollapseDetector, TrainingHalted
from moe import compat
from moe.timing import WallTimer
from parallel.all_to_all import CommCounter, collective
from parallel.dist import WorldInfo
from parallel.ds_moe import shard_moe_layers
from parallel.engine import bf16_reduction, build_engine, sync_batchnorm_stats
from parallel.groups import ParallelGroups
from reid.config import RunConfig
from reid.data import Batch, DataError, PKSampler, dataset_summary, image_size, load_splits
from reid.losses import reid_loss
from reid.prefetch import BatchFeed
from reid.model import ReIDModel

CKPT_DIR = "checkpoints"


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**31 - 1)


WARMUP_STEPS = 3  # first steps left out of throughput and stage timing (first calls, allocator)


class Trainer:
    """Builds everything once; ``train`` runs the steps; ``evaluate`` the retrieval metrics.

    Preemption: SIGUSR1 (SLURM's warning, ``--signal=USR1@T``) or SIGTERM sets a flag; at the
    end of the step every rank learns of it (it rides on the per-step all-reduce), all stop after
    the *same* step, save a checkpoint and, under SLURM, rank 0 requeues the job
    (launcher/preemption.py); the requeued job resumes from that checkpoint (``--auto-resume``).
    """

    def __init__(self, cfg: RunConfig, world: WorldInfo, progress: bool = True, preemption: Preemption | None = None):
        self.cfg, self.world = cfg, world
        self.preemption = preemption if preemption is not None else Preemption()
        self.rank, self.world_size = world.rank, world.world_size
        self.device = world.device
        self.progress = progress and self.rank == 0
        self.run_dir = cfg.run_dir
        self.ckpt_dir = os.path.join(self.run_dir, CKPT_DIR)
        tc = cfg.train

        self.splits = load_splits(cfg.data.path)
        h, w = image_size(self.splits)
        stride = cfg.model.stem_stride
        if h % stride or w % stride:
            raise DataError(f"images of {h}x{w} in {cfg.data.path!r} do not divide by model.stem_stride={stride}: "
                            f"use a stride that divides both, or data of another size")
        self.data_summary = dataset_summary(self.splits)
        train_pids = np.asarray(self.splits["train"]["pid"])
        self.label_of = {int(p): i for i, p in enumerate(np.unique(train_pids))}
        self.sampler = PKSampler(train_pids, tc.p, tc.k, self.world_size, self.rank, cfg.seed)

        self.groups = ParallelGroups.build(tc.ep_size, cfg.model.num_experts, timeout_s=tc.collective_timeout_s)
        self.timer = WallTimer()
        self.comm = CommCounter()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank, for every EP size
        model = ReIDModel(cfg.model, num_classes=len(self.label_of))
        self.moe_layers = shard_moe_layers(model, self.groups, self.comm, self.timer)
        self.dtype = torch.bfloat16 if tc.precision == "bf16" else torch.float32
        self.feed = BatchFeed(self.splits["train"], self.sampler, self.device, self.dtype, tc.prefetch, end=tc.steps)
        ds_config = {
            "train_micro_batch_size_per_gpu": tc.p * tc.k // self.world_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": tc.zero_stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": tc.grad_clip,
            "bf16": {"enabled": tc.precision == "bf16"},
            "steps_per_print": 10**9,
        }
        if tc.precision == "bf16":
            ds_config.update(bf16_reduction(tc.zero_stage))
        self.moe_engine = build_engine(
            model.to(self.device), self.groups, ds_config,
            lambda groups: torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay),
            weight_decay=tc.weight_decay,
        )
        self.engine = self.moe_engine.engine
        self.model = self.engine.module
        self.history = History()
        self.step = 0
        self.stage_s: dict[str, float] = {}  # seconds per stage, summed over the sampled steps
        self.stage_samples = 0  # steps whose stages were measured
        self.train_time_s = 0.0
        self.timed_steps = 0
        self.a2a_per_step: dict = {}
        self.preempted = False
        self.bad_steps = BadStepGuard(tc.max_bad_steps)
        self.collapse = CollapseDetector(tc.collapse_share, tc.collapse_intervals,
                                         [f"block{b}" for b in cfg.model.moe_blocks])
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ data
    def batch(self, step: int) -> tuple[Batch, torch.Tensor]:
        """Step ``step``'s batch and labels on the device, made ahead by the prefetch thread
        (``train.prefetch``; reid/prefetch.py). Asking for another step than the next one (a resume)
        restarts the thread there."""
        sb = self.feed.get(step)
        return sb.batch, sb.labels

    def close(self) -> None:
        """Stop the prefetch thread (also after an error or a preemption; safe to call twice)."""
        self.feed.close()

    # ------------------------------------------------------------ checkpoint
    def save(self) -> None:
        """Atomic: written by every rank, then committed by rank 0 (see launcher/checkpoints.py)."""
        client = {"step": self.step, "history": self.history.as_dict(), "stage_s": self.stage_s,
                  "train_time_s": self.train_time_s, "timed_steps": self.timed_steps, "stage_samples": self.stage_samples,
                  "skipped_steps": self.bad_steps.skipped, "warnings": self.warnings,
                  "collapse_events": self.collapse.events}
        checkpoints.save(self.engine, self.ckpt_dir, self.step, client, self.cfg.train.keep_last, self.rank,
                         self.world_size)

    def has_checkpoint(self) -> bool:
        return checkpoints.newest_complete(self.ckpt_dir) is not None

    def resume(self) -> int:
        """Load the newest *complete* checkpoint of this run; returns the step it continues from."""
        tag = checkpoints.newest_complete(self.ckpt_dir)
        if tag is None:
            partial = checkpoints.incomplete(self.ckpt_dir)
            raise FileNotFoundError(f"--resume: no complete checkpoint in {self.ckpt_dir}"
                                    + (f" (incomplete, ignored: {partial})" if partial else "")
                                    + f"; run without --resume to start {self.cfg.name!r} from scratch")
        path, client = self._load(self.ckpt_dir, tag=tag)
        if path is None:
            raise RuntimeError(f"--resume: DeepSpeed could not load {tag} in {self.ckpt_dir}")
        return self._restore(client)

    def _load(self, ckpt_dir: str, **kwargs):
        """DeepSpeed's load, with a clear error for a checkpoint of another model shape."""
        try:
            return self.engine.load_checkpoint(ckpt_dir, **kwargs)
        except RuntimeError as exc:
            text = str(exc)
            if "size mismatch" in text or "Missing key" in text or "Unexpected key" in text:
                first = next((ln.strip() for ln in text.splitlines() if "size mismatch" in ln or "key" in ln), "")
                raise checkpoints.CheckpointMismatch(
                    f"the checkpoint in {ckpt_dir} was saved by a model of another shape than config "
                    f"{self.cfg.name!r} builds ({first[:200]}); train with the config it was saved with "
                    f"(its run directory holds config.yaml), or change the expert count with `msmoe convert`"
                ) from None
            raise

    def load_weights(self, ckpt_dir: str) -> int:
        """Weights only (no optimizer state), e.g. a checkpoint converted to another expert count.
        Returns the step it was saved at (0 if unknown); training still starts at step 0."""
        if not os.path.isfile(os.path.join(ckpt_dir, "latest")):
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (no 'latest' file)")
        path, client = self._load(ckpt_dir, load_module_only=True, load_optimizer_states=False,
                                  load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the weights in {ckpt_dir}")
        return int((client or {}).get("step", 0))

    def _restore(self, client: dict) -> int:
        self.step = int(client["step"])
        self.history = History(**client["history"])
        self.stage_s = dict(client.get("stage_s", {}))
        self.train_time_s = float(client.get("train_time_s", 0.0))
        self.timed_steps = int(client.get("timed_steps", 0))
        self.stage_samples = int(client.get("stage_samples", self.timed_steps))
        self.bad_steps.skipped = list(client.get("skipped_steps", []))
        self.warnings = list(client.get("warnings", []))
        self.collapse.events = list(client.get("collapse_events", []))
        return self.step

    # ----------------------------------------------------------------- train
    def _clock(self, sync: bool) -> float:
        """perf_counter, after the device's queued work when ``sync`` (sampled steps on CUDA only)."""
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def train_step(self, s: int, interval: "IntervalStats", sampled: bool = False) -> StepResult:
        """One optimizer step (step ``s``): batch, forward, loss, backward, then - after the step's one
        all-reduce (finiteness, losses, preemption: the one host read) - the update or a skip.

        Routing statistics are added to ``interval`` on the device. ``sampled`` measures the stage
        breakdown (synchronising a GPU between stages); other steps do not wait for the device
        except for the all-to-all split sizes (one per dispatching layer) and the host read above."""
        tc = self.cfg.train
        torch.manual_seed(step_seed(self.cfg.seed, s, self.rank))
        for group in self.engine.optimizer.param_groups:
            group["lr"] = tc.lr_at(s)
        self.timer.active = sampled
        self.timer.reset()
        t0 = self._clock(sampled)
        b, labels = self.batch(s)
        t1 = self._clock(sampled)
        out = self.engine(b)
        parts = reid_loss(out.logits, out.feat, labels, out.aux_loss, label_smoothing=tc.label_smoothing,
                          margin=tc.triplet_margin, triplet_weight=tc.triplet_weight)
        if faults.active("nan_loss", s, self.rank):
            parts = dataclasses.replace(parts, total=parts.total * float("nan"))
        t2 = self._clock(sampled)
        self.engine.backward(parts.total)  # every rank, always: the backward's all-to-alls pair up
        t3 = self._clock(sampled)
        active = interval.add(out)
        flag = 1.0 if self.preemption.signal is not None else 0.0
        host = self._reduce_step(parts, active, flag)
        if host.bad:  # skipped on every rank alike: no update, gradients dropped
            self.engine.zero_grad()
        else:
            self.moe_engine.clip_gradients()
            self.engine.step()
        sync_batchnorm_stats(self.model, self.groups)
        t4 = self._clock(sampled)
        if sampled:
            self.stage_samples += 1
            for name, secs in (("data", t1 - t0), ("forward", t2 - t1), ("backward", t3 - t2),
                               ("optimizer", t4 - t3), *self.timer.as_dict().items()):
                self.stage_s[name] = self.stage_s.get(name, 0.0) + secs
        return host

    def _reduce_step(self, parts, active: torch.Tensor, flag: float) -> StepResult:
        """The step's one all-reduce and one host read: non-finite flag (loss or any local gradient),
        loss parts, active experts and the preemption flag, all summed over ranks at once."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norms = torch.stack([parts.total.detach().float().reshape(()),
                             *[n.float() for n in compat.foreach_norm(grads)]]) if grads \
            else parts.total.detach().float().reshape(1)
        bad = (~torch.isfinite(norms).all()).double()
        vec = torch.stack([bad, parts.total.detach().double(), parts.id.double(), parts.triplet.double(),
                           parts.aux.double(), active.double(),
                           torch.tensor(flag, dtype=torch.float64, device=bad.device)])
        vec = vec.to(self.device)  # NCCL reduces device tensors only
        if self.world_size > 1:
            collective("all-reduce of the step's losses, finiteness and preemption flag", dist.all_reduce, vec,
                       host_reads=True)
        bad_n, total, ce, tri, aux, act, preempt = vec.tolist()
        w = self.world_size
        return StepResult(bad_n > 0, total / w, ce / w, tri / w, aux / w, act / w, preempt > 0)

    def train(self, stop_at: int | None = None) -> None:
        tc = self.cfg.train
        end = min(tc.steps, stop_at) if stop_at is not None else tc.steps
        interval = IntervalStats()
        bar = tqdm(total=tc.steps, initial=self.step, desc=f"train {self.cfg.name}", disable=not self.progress,
                   unit="step", dynamic_ncols=True)
        samples_per_step = tc.p * tc.k
        first_step = self.step
        self.comm.reset()
        self.engine.train()
        while self.step < end:
            s = self.step
            faults.maybe("kill", s, self.rank)
            faults.maybe("stall", s, self.rank)
            sampled = tc.stage_timing == "sampled" and s >= WARMUP_STEPS and (s - WARMUP_STEPS) % tc.log_every == 0
            t0 = time.perf_counter()
            r = self.train_step(s, interval, sampled)
            if r.bad:
                self._bad_step(s)
            else:
                self.bad_steps.record(s, False)
            h = self.history
            h.loss.append(r.loss), h.id.append(r.id), h.triplet.append(r.triplet), h.aux.append(r.aux)
            h.lr.append(tc.lr_at(s))
            h.active_per_step.append(r.active)
            self.step += 1
            if s >= WARMUP_STEPS:  # leave start-up (first calls, allocator) out of throughput
                self.train_time_s += time.perf_counter() - t0
                self.timed_steps += 1
            if self.step % tc.log_every == 0 or self.step == end:
                self._log_interval(interval)
                interval = IntervalStats()
            if self.step % tc.ckpt_every == 0 and self.step < end:
                self.save()
            sps = samples_per_step * self.timed_steps / self.train_time_s if self.train_time_s else 0.0
            bar.set_postfix(loss=f"{r.loss:.3f}", id=f"{r.id:.3f}", tri=f"{r.triplet:.3f}", samples_s=f"{sps:.1f}")
            bar.update(1)
            if r.preempt:  # some rank was signalled: every rank stops after this same step
                self.preempted = True
                break
        bar.close()
        self.timer.active = False  # evaluation is not timed
        run = max(self.step - first_step, 1)
        self.a2a_per_step = {"total": self.comm.total_bytes / run, "offrank": self.comm.offrank_bytes / run,
                             "forward": self.comm.by_direction["forward"] / run,
                             "backward": self.comm.by_direction["backward"] / run, "calls": self.comm.calls / run}
        self.save()

    def _bad_step(self, s: int) -> None:
        """A skipped step: count it; too many in a row checkpoint and halt."""
        tc = self.cfg.train
        if self.bad_steps.record(s, True):
            self.step = s + 1
            self.save()
            raise TrainingHalted(
                f"{self.bad_steps.in_a_row} steps in a row (up to step {s + 1}) had a non-finite loss or "
                f"gradients (train.max_bad_steps={tc.max_bad_steps}); stopped with a checkpoint at step "
                f"{self.step} in {self.ckpt_dir}. Lower train.lr, check the data for NaN pixels, or "
                "use precision=fp32")
        if self.rank == 0:
            print(f"step {s + 1}: non-finite loss or gradients on some rank: step skipped "
                  f"({self.bad_steps.in_a_row} in a row, {len(self.bad_steps.skipped)} in all)", flush=True)

    def _log_interval(self, interval: "IntervalStats") -> None:
        """A logging step: the interval's routing statistics, summed over ranks, read on the host."""
        if interval.steps == 0:
            return
        reduced = interval.packed().to(self.device)
        if self.world_size > 1:
            collective("all-reduce of the interval's routing statistics", dist.all_reduce, reduced, host_reads=True)
        reduced = reduced.cpu()
        w = self.world_size
        nl, ns = interval.load.numel(), interval.fusion.numel()
        h = self.history
        h.load_steps.append(self.step)
        h.load.append(reduced[:nl].reshape(interval.load.shape).tolist())
        h.fusion_load.append((reduced[nl:nl + ns] / w).tolist())
        h.dropped.append(float(reduced[nl + ns]) / w)
        h.active.append(float(reduced[nl + ns + 1]) / w)
        for msg in self.collapse.update(self.step, h.load[-1]):
            self.warnings.append(msg)
            if self.rank == 0:
                print(f"warning: {msg}", flush=True)

    # ------------------------------------------------------------------ eval
    def evaluate(self):
        ec = self.cfg.eval
        return retrieval(self.model, self.splits, ec.batch_size, self.rank, self.world_size, self.device,
                         ec.max_rank, self.dtype)

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

    def summary(self, metrics, untrained, elapsed_s: float, peak_mem_mb: list[float] | None = None) -> dict:
        tc = self.cfg.train
        timed = max(self.timed_steps, 1)
        stage_ms = {k: 1000 * v / max(self.stage_samples, 1) for k, v in self.stage_s.items()}
        stage_ms["step"] = 1000 * self.train_time_s / timed
        h = self.history
        last = np.asarray(h.load[-1]) if h.load else np.zeros((0, 0))
        total_load = np.asarray(h.load).sum(0) if h.load else np.zeros((0, 0))
        out = {
            "name": self.cfg.name,
            **{k: v for k, v in metrics.as_dict().items()},
            "untrained": untrained.as_dict() if untrained is not None else None,
            "loss_history": h.loss,
            "final_loss": h.loss[-1] if h.loss else None,
            "samples_per_s": tc.p * tc.k * self.timed_steps / self.train_time_s if self.train_time_s else 0.0,
            "world_size": self.world_size,
            "threads_per_rank": torch.get_num_threads(),
            "ep_size": self.groups.ep_size,
            "num_experts": self.cfg.model.num_experts,
            "moe_layers": len(self.moe_layers),
            "steps": self.step,
            "step_time_ms": stage_ms,
            "stage_timing": {"mode": tc.stage_timing, "sampled_steps": self.stage_samples},
            "expert_load": {
                f"block{b}": {"last_interval": last[i].tolist(), "whole_run": total_load[i].tolist(),
                              "fraction": (total_load[i] / max(total_load[i].sum(), 1)).tolist()}
                for i, b in enumerate(self.cfg.model.moe_blocks) if i < len(last)
            },
            "fusion_weight_mean": h.fusion_load[-1] if h.fusion_load else None,
            "dropped_fraction": h.dropped[-1] if h.dropped else 0.0,
            "active_experts_per_patch": h.active[-1] if h.active else None,
            "a2a_bytes_per_step": self.a2a_per_step,
            "skipped_steps": self.bad_steps.skipped,
            "warnings": self.warnings,
            "expert_collapse": self.collapse.events,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_mem_mb_per_rank": peak_mem_mb,
            "launcher": self.world.launcher,
            "backend": self.world.backend,
            "device": str(self.device),
            "elapsed_s": elapsed_s,
            "data": self.data_summary,
            "history": h.as_dict(),
            "config": self.cfg.to_dict(),
        }
        return out


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def check_data(cfg: RunConfig) -> None:
    from reid.data import read_meta

    if read_meta(cfg.data.path) is None:
        raise DataError(f"no dataset at data.path={cfg.data.path!r}: run `msmoe data synth --out {cfg.data.path}` "
                        "(or import one with `msmoe data rgbnt201`)")

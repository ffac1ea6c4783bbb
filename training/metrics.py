"""What the trainer learns of its steps: per-step history, the step's host-read result, the routing
statistics of a logging interval (accumulated on the device, read at logging steps), the stage
clock of a sampled step and the run's progress (saved with every checkpoint)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from common.files import write_text_atomic


@dataclass
class History:
    """Per-step means over ranks, plus per-layer expert load per logging interval."""

    loss: list = field(default_factory=list)
    id: list = field(default_factory=list)
    triplet: list = field(default_factory=list)
    aux: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    load_steps: list = field(default_factory=list)  # step at the end of each interval
    load: list = field(default_factory=list)  # [interval][layer][expert] routed patches (world sum)
    fusion_load: list = field(default_factory=list)  # [interval][scale] mean gate weight
    dropped: list = field(default_factory=list)  # [interval] dropped fraction (mean over layers)
    active: list = field(default_factory=list)  # [interval] mean active experts per patch
    active_per_step: list = field(default_factory=list)  # [step] mean active experts per patch (top-p)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class StepResult:
    """What the host learns of a step, from its one all-reduce (means over ranks)."""

    bad: bool  # the loss or a gradient was not finite on some rank: the step was skipped
    loss: float
    id: float
    triplet: float
    aux: float
    active: float  # mean active experts per patch over the MoE layers
    preempt: int  # the stop signal some rank received, agreed over ranks (training/preemption.py); 0: none


class IntervalStats:
    """Routing statistics of a logging interval, accumulated on the device (read at log steps).

    load [layers, E] routed patches; fusion [S] mean fusion weight; dropped [layers]: sums over
    steps of each layer's dropped fraction; active: sum over steps of the per-step mean over layers."""

    def __init__(self) -> None:
        self.steps = 0
        self.load = self.fusion = self.dropped = self.active = None

    def add(self, out) -> torch.Tensor:
        """Add one step's statistics; returns the step's mean active experts per patch (0-d)."""
        fw = out.fusion_weights.detach().float().mean(0)
        if out.moe_stats:
            load = torch.stack([st.load.float() for st in out.moe_stats])
            dropped = torch.stack([st.dropped_fraction.float().reshape(()) for st in out.moe_stats])
            active = torch.stack([st.active_experts for st in out.moe_stats]).mean()
        else:
            load, dropped, active = fw.new_zeros(0), fw.new_zeros(0), fw.new_zeros(())
        first = self.steps == 0
        self.load = load if first else self.load + load
        self.fusion = fw if first else self.fusion + fw
        self.dropped = dropped if first else self.dropped + dropped
        self.active = active if first else self.active + active
        self.steps += 1
        return active

    def packed(self) -> torch.Tensor:
        """[load..., fusion mean..., dropped mean per layer..., active mean] as one float64 vector
        (one all-reduce); :meth:`unpack` reads the reduced vector back."""
        n = self.steps
        return torch.cat([self.load.flatten().double(), self.fusion.double() / n, self.dropped.double() / n,
                          self.active.double().reshape(1) / n])

    def unpack(self, reduced: torch.Tensor, world_size: int) -> dict:
        """The all-reduced :meth:`packed` vector (on the host) as load [layers][E] (world sums),
        fusion [S], dropped [layers] and active (means over ranks)."""
        nl, ns, nd = self.load.numel(), self.fusion.numel(), self.dropped.numel()
        w = world_size
        return {"load": reduced[:nl].reshape(self.load.shape).tolist(),
                "fusion": (reduced[nl:nl + ns] / w).tolist(),
                "dropped": (reduced[nl + ns:nl + ns + nd] / w).tolist(),
                "active": float(reduced[nl + ns + nd]) / w}


class StageClock:
    """Stage boundaries of one step: ``mark(name)`` closes the stage that began at the previous
    mark. Only a sampled step measures (on CUDA it waits for the queued work at each mark); the
    layers' own stage timer is switched on and reset with it."""

    def __init__(self, device: torch.device, sampled: bool, layer_timer) -> None:
        self.device, self.sampled, self.layer_timer = device, sampled, layer_timer
        layer_timer.active = sampled
        layer_timer.reset()
        self.stages: dict[str, float] = {}
        self._last = self._now()

    def _now(self) -> float:
        if self.sampled and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self, name: str) -> None:
        if self.sampled:
            now = self._now()
            self.stages[name] = now - self._last
            self._last = now

    def measured(self) -> dict[str, float]:
        """This step's seconds per stage (the step's and the layers'); empty unless sampled."""
        return {**self.stages, **self.layer_timer.as_dict()} if self.sampled else {}


@dataclass
class RunProgress:
    """What a run has done so far, saved in every checkpoint: the history, the throughput clock
    (steps after the warm-up) and the sampled stage times."""

    history: History = field(default_factory=History)
    train_time_s: float = 0.0  # wall time of the timed steps
    timed_steps: int = 0
    stage_s: dict = field(default_factory=dict)  # seconds per stage, summed over the sampled steps
    stage_samples: int = 0  # steps whose stages were measured
    warnings: list = field(default_factory=list)

    def record(self, r: StepResult, lr: float, seconds: float | None) -> None:
        """One finished step (skipped or not); ``seconds`` None: a warm-up step, not timed."""
        h = self.history
        h.loss.append(r.loss), h.id.append(r.id), h.triplet.append(r.triplet), h.aux.append(r.aux)
        h.lr.append(lr)
        h.active_per_step.append(r.active)
        if seconds is not None:
            self.train_time_s += seconds
            self.timed_steps += 1

    def add_stages(self, stages: dict[str, float]) -> None:
        """A sampled step's seconds per stage (nothing when the step was not sampled)."""
        if stages:
            self.stage_samples += 1
            for name, secs in stages.items():
                self.stage_s[name] = self.stage_s.get(name, 0.0) + secs

    def samples_per_s(self, samples_per_step: int) -> float:
        return samples_per_step * self.timed_steps / self.train_time_s if self.train_time_s else 0.0

    def step_time_ms(self) -> dict[str, float]:
        out = {k: 1000 * v / max(self.stage_samples, 1) for k, v in self.stage_s.items()}
        out["step"] = 1000 * self.train_time_s / max(self.timed_steps, 1)
        return out

    def state_dict(self) -> dict:
        return {"history": self.history.as_dict(), "stage_s": self.stage_s, "train_time_s": self.train_time_s,
                "timed_steps": self.timed_steps, "stage_samples": self.stage_samples, "warnings": self.warnings}

    @classmethod
    def from_state_dict(cls, d: dict) -> "RunProgress":
        timed = int(d.get("timed_steps", 0))
        return cls(History(**d["history"]), float(d.get("train_time_s", 0.0)), timed, dict(d.get("stage_s", {})),
                   int(d.get("stage_samples", timed)), list(d.get("warnings", [])))


def interval_record(*, step: int, result: StepResult, lr: float, seconds: float, steps: int, total_steps: int,
                    samples_per_step: int, stages_s: dict, layer_names: list[str], load: list, dropped: list,
                    active: float, a2a_bytes: dict) -> dict:
    """One line of metrics.jsonl (training/run_log.py): the logging step ``step`` (steps done, as
    logged) after an interval of ``steps`` steps that took ``seconds`` of wall time.

    loss          the logging step's loss parts (means over ranks), as in summary.json's history
    lr            the logging step's learning rate
    samples_per_s over the interval (global batch x steps / wall time)
    eta_s         the steps left to train.steps at the interval's pace
    step_time_ms  step: the interval's mean wall time per step; the rest: the stage breakdown of the
                  interval's sampled step (data, forward, backward, optimizer; route, dispatch,
                  experts, combine summed over the MoE layers); absent with train.stage_timing=off
    expert_load   per MoE layer: each expert's share of the interval's routed patches (all ranks)
    dropped_fraction  per MoE layer: the interval's mean share of routed patches over capacity
    active_experts    mean experts per patch (mean over layers, steps and ranks)
    a2a_bytes_per_step  rank 0's all-to-all payload bytes per step over the interval (total, offrank)
    """
    per_step = seconds / max(steps, 1)
    return {
        "step": step,
        "loss": {"total": result.loss, "id": result.id, "triplet": result.triplet, "aux": result.aux},
        "lr": lr,
        "samples_per_s": samples_per_step * steps / seconds if seconds > 0 else 0.0,
        "eta_s": per_step * max(total_steps - step, 0),
        "step_time_ms": {"step": 1000 * per_step, **{k: 1000 * v for k, v in stages_s.items()}},
        "expert_load": {name: (np.asarray(row, dtype=float) / max(sum(row), 1)).tolist()
                        for name, row in zip(layer_names, load)},
        "dropped_fraction": dict(zip(layer_names, dropped)),
        "active_experts": active,
        "a2a_bytes_per_step": {k: v / max(steps, 1) for k, v in a2a_bytes.items()},
    }


def a2a_per_step(comm, steps: int) -> dict:
    """All-to-all bytes and calls per step, from a CommCounter that counted ``steps`` steps."""
    return {"total": comm.total_bytes / steps, "offrank": comm.offrank_bytes / steps,
            "forward": comm.by_direction["forward"] / steps, "backward": comm.by_direction["backward"] / steps,
            "calls": comm.calls / steps}


def finite_or_null(obj):
    """``obj`` with every non-finite float (a skipped step's NaN loss) as None: strict JSON readers
    reject NaN and Infinity, and null says "no value" to all of them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def write_json(path: str, obj) -> None:
    """Strict JSON (non-finite numbers as null), written atomically: a reader never sees half a file."""
    write_text_atomic(path, json.dumps(finite_or_null(obj), indent=1, allow_nan=False))


def build_summary(*, cfg, world, ep_size: int, moe_layers: int, steps: int, progress: RunProgress,
                  skipped_steps: list, collapse_events: list, a2a_per_step: dict, metrics, untrained,
                  elapsed_s: float, peak_mem_mb: list[float] | None, data_summary: dict,
                  model_cost: dict | None = None) -> dict:
    """summary.json: the run's figures (metrics, losses, throughput, stage times, expert load, memory)."""
    import resource

    tc, h = cfg.train, progress.history
    last = np.asarray(h.load[-1]) if h.load else np.zeros((0, 0))
    total_load = np.asarray(h.load).sum(0) if h.load else np.zeros((0, 0))
    return {
        "name": cfg.name,
        **metrics.as_dict(),
        "untrained": untrained.as_dict() if untrained is not None else None,
        "loss_history": h.loss,
        "final_loss": h.loss[-1] if h.loss else None,
        "samples_per_s": progress.samples_per_s(tc.p * tc.k),
        "world_size": world.world_size,
        "threads_per_rank": torch.get_num_threads(),
        "ep_size": ep_size,
        "num_experts": cfg.model.num_experts,
        "moe_layers": moe_layers,
        "steps": steps,
        "step_time_ms": progress.step_time_ms(),
        "stage_timing": {"mode": tc.stage_timing, "sampled_steps": progress.stage_samples},
        "expert_load": {
            f"block{b}": {"last_interval": last[i].tolist(), "whole_run": total_load[i].tolist(),
                          "fraction": (total_load[i] / max(total_load[i].sum(), 1)).tolist()}
            for i, b in enumerate(cfg.model.moe_blocks) if i < len(last)
        },
        "fusion_weight_mean": h.fusion_load[-1] if h.fusion_load else None,
        "dropped_fraction": h.dropped[-1] if h.dropped else 0.0,
        "active_experts_per_patch": h.active[-1] if h.active else None,
        "a2a_bytes_per_step": a2a_per_step,
        "model_cost": model_cost,
        "moe_usage": moe_usage(h, [f"block{b}" for b in cfg.model.moe_blocks]),
        "skipped_steps": skipped_steps,
        "warnings": progress.warnings,
        "expert_collapse": collapse_events,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_mem_mb_per_rank": peak_mem_mb,
        "launcher": world.launcher,
        "backend": world.backend,
        "device": str(world.device),
        "elapsed_s": elapsed_s,
        "data": data_summary,
        "history": h.as_dict(),
        "config": cfg.to_dict(),
    }


def moe_usage(history: History, layer_names: list[str], threshold_share: float = 0.5) -> dict:
    """The thesis's routing metrics, per MoE layer and for the multi-scale fusion gate:

    usage_variance   variance over experts of each expert's share of the whole run's routed patches
                     (0 = perfectly even; the load-balance view)
    activation_rate  share of experts (scales) that received at least ``threshold_share`` of an even
                     share (1/E) over the run: the experts really in use
    gate_stability   mean over experts of the standard deviation, across logging intervals, of their
                     share per interval (0 = the routing distribution did not move during training)
    """
    def stats(per_interval: np.ndarray) -> dict:  # [intervals, experts], rows are shares summing to 1
        whole = per_interval.mean(0)
        n = per_interval.shape[1]
        return {"usage_variance": float(whole.var()), "activation_rate": float((whole >= threshold_share / n).mean()),
                "gate_stability": float(per_interval.std(0).mean()), "share": whole.tolist()}

    out: dict = {"threshold_share": threshold_share, "layers": {}}
    if history.load:
        load = np.asarray(history.load, dtype=float)  # [intervals, layers, experts]
        for i, name in enumerate(layer_names[: load.shape[1]]):
            totals = load[:, i].sum(1, keepdims=True)
            keep = totals[:, 0] > 0
            if keep.any():
                out["layers"][name] = stats(load[keep, i] / totals[keep])
    if history.fusion_load:
        fusion = np.asarray(history.fusion_load, dtype=float)  # [intervals, scales] mean gate weights
        out["fusion_gate"] = stats(fusion / fusion.sum(1, keepdims=True))
    return out

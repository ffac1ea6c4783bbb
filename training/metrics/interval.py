"""A logging interval: routing statistics accumulated on the device over its steps (read on the
host once, at the logging step), where it began, and the metrics.jsonl record it becomes."""

from __future__ import annotations

import numpy as np
import torch

from moe.balance import COVERAGE_BINS
from parallel.all_to_all import CommCounter
from training.metrics.records import StepResult


class Span:
    """Where the current logging interval began: step, wall clock, all-to-all byte counters."""

    def __init__(self, step: int, t0: float, comm: CommCounter) -> None:
        self.step, self.t0 = step, t0
        self.a2a_total, self.a2a_offrank = comm.total_bytes, comm.offrank_bytes
        self.a2a_cross_node = comm.cross_node_bytes

    def a2a_bytes(self, comm: CommCounter) -> dict:
        """The bytes ``comm`` counted since this span began: total, offrank and, where the counter
        knows the nodes, cross_node."""
        out = {"total": comm.total_bytes - self.a2a_total, "offrank": comm.offrank_bytes - self.a2a_offrank}
        if comm.node_size:
            out["cross_node"] = comm.cross_node_bytes - self.a2a_cross_node
        return out


class IntervalStats:
    """Routing statistics of a logging interval, accumulated on the device (read at log steps).

    load [layers, E] routed patches; fusion [S] mean fusion weight; dropped [layers]: sums over
    steps of each layer's dropped fraction; active: sum over steps of the per-step mean over layers;
    coverage [layers, 5]: sums over steps of each expert-choice layer's share of patches taken by
    0, 1, 2, 3, 4+ experts (zeros for token-choice layers, named in ``coverage_layers``)."""

    def __init__(self) -> None:
        self.steps = 0
        self.load = self.fusion = self.dropped = self.active = self.coverage = None
        self.coverage_layers: list[int] = []

    def add(self, out) -> torch.Tensor:
        """Add one step's statistics; returns the step's mean active experts per patch (0-d)."""
        fw = out.fusion_weights.detach().float().mean(0)
        if out.moe_stats:
            load = torch.stack([st.load.float() for st in out.moe_stats])
            dropped = torch.stack([st.dropped_fraction.float().reshape(()) for st in out.moe_stats])
            active = torch.stack([st.active_experts for st in out.moe_stats]).mean()
        else:
            load, dropped, active = fw.new_zeros(0), fw.new_zeros(0), fw.new_zeros(())
        self.coverage_layers = [i for i, st in enumerate(out.moe_stats) if st.coverage is not None]
        coverage = torch.stack([st.coverage.float() if st.coverage is not None else fw.new_zeros(COVERAGE_BINS)
                                for st in out.moe_stats]) if self.coverage_layers else fw.new_zeros(0)
        first = self.steps == 0
        self.coverage = coverage if first else self.coverage + coverage
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
                          self.active.double().reshape(1) / n, self.coverage.flatten().double() / n])

    def unpack(self, reduced: torch.Tensor, world_size: int) -> dict:
        """The all-reduced :meth:`packed` vector (on the host) as load [layers][E] (world sums),
        fusion [S], dropped [layers] and active (means over ranks)."""
        nl, ns, nd = self.load.numel(), self.fusion.numel(), self.dropped.numel()
        w = world_size
        cov = (reduced[nl + ns + nd + 1:] / w).reshape(self.coverage.shape).tolist()
        return {"load": reduced[:nl].reshape(self.load.shape).tolist(),
                "fusion": (reduced[nl:nl + ns] / w).tolist(),
                "dropped": (reduced[nl + ns:nl + ns + nd] / w).tolist(),
                "active": float(reduced[nl + ns + nd]) / w,
                "coverage": [cov[i] if i in self.coverage_layers else None for i in range(nd)]}



def interval_record(*, step: int, result: StepResult, lr: float, seconds: float, steps: int, total_steps: int,
                    samples_per_step: int, stages_s: dict, layer_names: list[str], load: list, dropped: list,
                    active: float, a2a_bytes: dict, coverage: list | None = None) -> dict:
    """One line of metrics.jsonl (training/metrics/run_log.py): the logging step ``step`` (steps done, as
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
    patch_coverage    per expert-choice layer: the share of its routed patches taken by 0, 1, 2, 3 and
                  4+ experts (share 0: untaken, the analogue of dropped); absent without such layers
    a2a_bytes_per_step  rank 0's all-to-all payload bytes per step over the interval (total, offrank and,
                  when the nodes are known, cross_node: sent to a rank of another node)
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
        **({"patch_coverage": {name: c for name, c in zip(layer_names, coverage) if c is not None}}
           if coverage and any(c is not None for c in coverage) else {}),
    }


def a2a_per_step(comm, steps: int) -> dict:
    """All-to-all bytes and calls per step, from a CommCounter that counted ``steps`` steps; with
    ``cross_node`` (bytes sent to a rank of another node) when the counter knows the nodes."""
    out = {"total": comm.total_bytes / steps, "offrank": comm.offrank_bytes / steps,
           "forward": comm.by_direction["forward"] / steps, "backward": comm.by_direction["backward"] / steps,
           "calls": comm.calls / steps}
    if comm.node_size:
        out["cross_node"] = comm.cross_node_bytes / steps
    return out

"""What the trainer learns of its steps: per-step history, the step's host-read result, and the
routing statistics of a logging interval (accumulated on the device, read at logging steps)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    preempt: bool  # some rank was signalled


class IntervalStats:
    """Routing statistics of a logging interval, accumulated on the device (read at log steps).

    load [layers, E] routed patches; fusion [S] mean fusion weight; dropped and active: sums over
    steps of the per-step mean over layers."""

    def __init__(self) -> None:
        self.steps = 0
        self.load = self.fusion = self.dropped = self.active = None

    def add(self, out) -> torch.Tensor:
        """Add one step's statistics; returns the step's mean active experts per patch (0-d)."""
        fw = out.fusion_weights.detach().float().mean(0)
        if out.moe_stats:
            load = torch.stack([st.load.float() for st in out.moe_stats])
            dropped = torch.stack([st.dropped_fraction for st in out.moe_stats]).mean()
            active = torch.stack([st.active_experts for st in out.moe_stats]).mean()
        else:
            load, dropped, active = fw.new_zeros(0), fw.new_zeros(()), fw.new_zeros(())
        first = self.steps == 0
        self.load = load if first else self.load + load
        self.fusion = fw if first else self.fusion + fw
        self.dropped = dropped if first else self.dropped + dropped
        self.active = active if first else self.active + active
        self.steps += 1
        return active

    def packed(self) -> torch.Tensor:
        """[load..., fusion mean..., dropped mean, active mean] as one float64 vector (one all-reduce)."""
        n = self.steps
        return torch.cat([self.load.flatten().double(), self.fusion.double() / n,
                          torch.stack([self.dropped, self.active]).double() / n])

"""What a run keeps of its steps: the step's host-read result, the per-step history and the run's
progress (saved with every checkpoint), and the strict JSON its files are written in."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

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
    coverage: list = field(default_factory=list)  # [interval][layer] share of patches taken by 0..4+ experts
                                                  # (expert-choice layers; None for the others)

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



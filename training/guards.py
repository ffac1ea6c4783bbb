"""Training guards: non-finite steps and expert collapse.

``BadStepGuard`` counts steps whose loss or gradients were not finite on some rank (the step is
skipped on every rank: no optimizer update) and says when too many came in a row.
``CollapseDetector`` watches each MoE layer's share of routed patches per logging interval and
reports a layer whose busiest expert kept more than ``share`` of them for ``intervals`` intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class TrainingHalted(RuntimeError):
    """The run stopped itself (after a checkpoint) because continuing would waste the allocation."""


@dataclass
class BadStepGuard:
    limit: int
    in_a_row: int = 0
    skipped: list = field(default_factory=list)  # step numbers that were skipped

    def record(self, step: int, bad: bool) -> bool:
        """Returns True when ``limit`` bad steps came in a row."""
        if not bad:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.skipped.append(step)
        return self.in_a_row >= self.limit


@dataclass
class CollapseDetector:
    share: float
    intervals: int
    layer_names: list
    streak: dict = field(default_factory=dict)  # layer -> (expert, intervals in a row, first step)
    events: list = field(default_factory=list)  # reported collapses (dicts)

    def update(self, step: int, load_LE) -> list[str]:
        """``load_LE``: routed patches per layer and expert in the last interval. Returns new warnings."""
        out = []
        load = np.asarray(load_LE, dtype=float)
        for i, name in enumerate(self.layer_names[: len(load)]):
            total = load[i].sum()
            if total <= 0:
                continue
            top = int(load[i].argmax())
            frac = float(load[i, top] / total)
            expert, n, first = self.streak.get(name, (None, 0, step))
            if frac > self.share:
                n, first = (n + 1, first) if expert == top else (1, step)
                self.streak[name] = (top, n, first)
                if n == self.intervals:
                    msg = (f"expert collapse in {name}: expert {top} took {frac:.0%} of the routed patches for "
                           f"{n} logging intervals in a row (up to step {step}); raise "
                           f"model.patch_moe.balance.load_balance_coef or router.bias_update_rate")
                    self.events.append({"layer": name, "expert": top, "share": frac, "step": step})
                    out.append(msg)
            else:
                self.streak.pop(name, None)
        return out

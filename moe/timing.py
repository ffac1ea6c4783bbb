"""The MoE layers' stage timers (the machinery: common/timing.py). A layer always enters
``timer.stage(name)``; the timer it was built with decides whether anything is measured.

Stages of a PatchMoE forward: route (unfold, pool, gate, plan), dispatch (to the experts'
ranks), experts (grouped matmuls), combine (back, weighted sum, fold). The all-to-all
dispatcher, given the same timer, times its steps inside them: dispatch.counts (count exchange
and the host read of the split sizes), dispatch.send (payload all-to-all), dispatch.regroup
(expert-major order); combine.regroup and combine.send. The outer totals include them.

While torch.profiler records (``train.profile_steps``), every timer also opens a named range
``moe.<stage>`` (``moe.route``, ``moe.dispatch``, ``moe.experts``, ``moe.combine``) around the
stage.
"""

from __future__ import annotations

from common import timing

SCOPE = "moe"  # profiler ranges moe.<stage>


class NullTimer(timing.NullTimer):
    """Measures nothing (a layer's default); names the stage ``moe.<stage>`` for a recording profiler."""

    scope = SCOPE


class WallTimer(timing.WallTimer):
    """Wall-clock seconds per MoE stage (see common/timing.py); the trainer switches it on for
    sampled steps only (one per logging interval)."""

    scope = SCOPE

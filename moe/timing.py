"""Stage timers for MoE layers: the layer always enters ``timer.stage(name)``; the timer it was
built with decides whether anything is measured (a null object by default), so ``forward``
carries no timer branches.

Stages of a PatchMoE forward: route (unfold, pool, gate, plan), dispatch (to the experts'
ranks), experts (grouped matmuls), combine (back, weighted sum, fold).

While torch.profiler records (``train.profile_steps``), every timer also opens a named range
``moe.<stage>`` (``moe.route``, ``moe.dispatch``, ``moe.experts``, ``moe.combine``) around the
stage; otherwise that costs one check of the profiler's state.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator, Protocol

import torch


class StageTimer(Protocol):
    def stage(self, name: str) -> AbstractContextManager: ...


def profiler_range(name: str) -> AbstractContextManager:
    """The range ``moe.<name>`` in a torch.profiler trace while one records; else nothing."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(f"moe.{name}")
    return nullcontext()


class NullTimer:
    """Measures nothing (the default); names the stage for a recording profiler."""

    def stage(self, name: str) -> AbstractContextManager:
        return profiler_range(name)


class WallTimer:
    """Accumulates wall-clock seconds per stage while ``active``; on CUDA it synchronises around
    each stage so the figures are real, which costs overlap and host syncs. The trainer
    therefore switches it on for sampled steps only (one per logging interval)."""

    def __init__(self, cuda_sync: bool | None = None, active: bool = True):
        self.cuda_sync = torch.cuda.is_available() if cuda_sync is None else cuda_sync
        self.active = active
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def stage(self, name: str) -> AbstractContextManager:
        return self._measure(name) if self.active else profiler_range(name)

    @contextmanager
    def _measure(self, name: str) -> Iterator[None]:
        if self.cuda_sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            with profiler_range(name):
                yield
        finally:
            if self.cuda_sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def as_dict(self) -> dict[str, float]:
        return dict(self.seconds)

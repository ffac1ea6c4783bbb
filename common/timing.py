"""Stage timers: code always enters ``timer.stage(name)``; the timer it was built with decides
whether anything is measured (a null object by default), so the timed code carries no timer
branches. A timer's ``scope`` names its stages for torch.profiler: while a profiler records, every
stage is also the named range ``<scope>.<name>``; otherwise that costs one check of the profiler's
state. A package names its timers by subclassing them with its own ``scope``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator, Protocol

import torch


class StageTimer(Protocol):
    def stage(self, name: str) -> AbstractContextManager: ...


def profiler_range(label: str) -> AbstractContextManager:
    """The range ``label`` in a torch.profiler trace while one records; else nothing (and nothing
    inside a torch.compile trace, where the compiled graph is what the profiler sees)."""
    if torch.compiler.is_compiling():
        return nullcontext()
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(label)
    return nullcontext()


class NullTimer:
    """Measures nothing; names the stage ``<scope>.<name>`` for a recording profiler."""

    scope = "stage"

    def stage(self, name: str) -> AbstractContextManager:
        return profiler_range(f"{self.scope}.{name}")


class WallTimer:
    """Accumulates wall-clock seconds per stage while ``active``; on CUDA it synchronises around
    each stage so the figures are real, which costs overlap and host syncs (so switch it on for
    sampled steps only). Ranges named as NullTimer's."""

    scope = "stage"

    def __init__(self, cuda_sync: bool | None = None, active: bool = True):
        self.cuda_sync = torch.cuda.is_available() if cuda_sync is None else cuda_sync
        self.active = active
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def stage(self, name: str) -> AbstractContextManager:
        return self._measure(name) if self.active else profiler_range(f"{self.scope}.{name}")

    @contextmanager
    def _measure(self, name: str) -> Iterator[None]:
        if self.cuda_sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            with profiler_range(f"{self.scope}.{name}"):
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

"""The stage clock of one step: seconds per stage of a sampled step (the layers' own timer with it)."""

from __future__ import annotations

import time

import torch


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

"""``train.profile_steps=[a, b]``: torch.profiler records steps a..b (numbered as logged: step a is
the a-th optimizer step) on every rank, CPU and CUDA activities with shapes, and writes

  runs/<name>/profile/trace_rank<R>.json   one Chrome trace per rank (chrome://tracing, Perfetto)

then rank 0 prints the top operators by self time. The MoE layers' stages are named ranges in the
trace (``moe.route``, ``moe.dispatch``, ``moe.experts``, ``moe.combine``; moe/timing.py), and every
recorded step is a range ``train.step <n>``.

  msmoe train --config configs/tiny.yaml train.profile_steps=[5,6]
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile, record_function

TOP_OPERATORS = 15


def trace_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, f"trace_rank{rank}.json")


class StepProfiler:
    """Starts the profiler before step a, stops it after step b (or when training ends first)."""

    def __init__(self, steps: tuple[int, int] | None, out_dir: str, rank: int, device: torch.device) -> None:
        self.steps, self.out_dir, self.rank, self.device = steps, out_dir, rank, device
        self.prof = None
        self.step_range = nullcontext()
        self.done = False
        self.first_recorded = self.last_recorded = 0

    def before(self, s: int) -> None:
        """Before the step of index ``s`` (step number s + 1); a resumed run inside a..b records the rest."""
        if self.steps is None or self.done:
            return
        first, last = self.steps
        if self.prof is None and first <= s + 1 <= last:
            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self.prof, self.first_recorded = profile(activities=activities, record_shapes=True), s + 1
            self.prof.__enter__()
        if self.prof is not None:
            self.last_recorded = s + 1
            self.step_range = record_function(f"train.step {s + 1}")
            self.step_range.__enter__()

    def after(self, s: int) -> None:
        if self.prof is None:
            return
        self.step_range.__exit__(None, None, None)
        self.step_range = nullcontext()
        if s + 1 >= self.steps[1]:
            self._finish(s + 1)

    def close(self) -> None:
        """Training ended (or failed) inside the range: keep what was recorded."""
        if self.prof is not None:
            self.step_range.__exit__(None, None, None)
            self._finish(self.last_recorded)

    def _finish(self, last: int) -> None:
        prof, self.prof, self.done = self.prof, None, True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof.__exit__(None, None, None)
        os.makedirs(self.out_dir, exist_ok=True)
        path = trace_path(self.out_dir, self.rank)
        prof.export_chrome_trace(path)
        if self.rank == 0:
            sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            print(f"profile of steps {self.first_recorded}-{last}: {path} (one trace per rank); top operators by "
                  f"{sort.replace('_', ' ')}, rank 0:", flush=True)
            print(prof.key_averages().table(sort_by=sort, row_limit=TOP_OPERATORS), flush=True)

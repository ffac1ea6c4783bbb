"""train.profile_steps (training/profiling.py, moe/timing.py, common/timing.py): only the chosen steps
are recorded, the MoE stage timers name their ranges in the trace, and nothing is opened when no
profiler records."""

import json
from contextlib import nullcontext

import torch

from common.timing import profiler_range
from moe.timing import NullTimer, WallTimer
from training.profiling import StepProfiler, trace_path


def _step(timer):
    x = torch.randn(8, 8)
    for name in ("route", "dispatch", "experts", "combine"):
        with timer.stage(name):
            x = x @ x.T


def test_profiles_exactly_the_chosen_steps_with_the_stage_ranges(tmp_path, capsys):
    prof = StepProfiler((2, 3), str(tmp_path), 0, torch.device("cpu"))
    timer = WallTimer(cuda_sync=False, active=False)
    for s in range(5):
        prof.before(s)
        _step(NullTimer() if s == 1 else timer)  # both kinds of timer name their stages
        prof.after(s)
    prof.close()
    with open(trace_path(str(tmp_path), 0)) as fh:
        names = {e.get("name") for e in json.load(fh)["traceEvents"]}
    assert {"moe.route", "moe.dispatch", "moe.experts", "moe.combine"} <= names
    assert {n for n in names if n and n.startswith("train.step")} == {"train.step 2", "train.step 3"}
    out = capsys.readouterr().out
    assert out.startswith("profile of steps 2-3: ") and "aten::mm" in out and "Self CPU %" in out


def test_a_run_that_ends_inside_the_range_keeps_its_trace(tmp_path):
    prof = StepProfiler((2, 9), str(tmp_path), 1, torch.device("cpu"))
    for s in range(3):
        prof.before(s)
        _step(NullTimer())
        prof.after(s)
    prof.close()
    with open(trace_path(str(tmp_path), 1)) as fh:
        names = {e.get("name") for e in json.load(fh)["traceEvents"]}
    assert {n for n in names if n and n.startswith("train.step")} == {"train.step 2", "train.step 3"}


def test_no_range_without_a_profiler(tmp_path):
    assert isinstance(profiler_range("moe.route"), nullcontext)
    prof = StepProfiler(None, str(tmp_path), 0, torch.device("cpu"))
    for s in range(3):
        prof.before(s)
        prof.after(s)
    prof.close()
    assert not tmp_path.joinpath("trace_rank0.json").exists()

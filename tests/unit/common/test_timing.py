"""common/timing.py: stage timers measure only when asked, and name their profiler ranges by scope."""

from contextlib import nullcontext

import torch

from common import timing


class _Scoped(timing.WallTimer):
    scope = "demo"


def test_wall_timer_counts_each_stage_while_active():
    timer = _Scoped(cuda_sync=False)
    for _ in range(3):
        with timer.stage("a"):
            pass
    with timer.stage("b"):
        pass
    assert timer.calls == {"a": 3, "b": 1} and set(timer.as_dict()) == {"a", "b"}
    timer.reset()
    timer.active = False
    with timer.stage("a"):
        pass
    assert timer.as_dict() == {} and timer.calls == {}


def test_the_scope_names_the_ranges_while_a_profiler_records():
    assert isinstance(timing.NullTimer().stage("y"), nullcontext)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with _Scoped(cuda_sync=False).stage("x"), timing.NullTimer().stage("y"):
            torch.ones(4).sum()
    assert {"demo.x", "stage.y"} <= {e.key for e in prof.key_averages()}

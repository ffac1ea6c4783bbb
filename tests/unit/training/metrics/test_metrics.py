"""Run progress (training/metrics/records.py): recorded steps, throughput clock, stage times, and the
checkpoint round trip that makes --resume continue the same figures."""

import pytest
import torch

from moe.timing import WallTimer
from training.metrics.clock import StageClock
from training.metrics.interval import Span, a2a_per_step
from training.metrics.records import RunProgress, StepResult
from parallel.all_to_all import CommCounter


def _result(loss: float) -> StepResult:
    return StepResult(False, loss, loss / 2, loss / 4, 0.01, 2.0, False)


def test_progress_records_and_survives_a_checkpoint():
    p = RunProgress()
    p.record(_result(3.0), 1e-3, None)  # a warm-up step: in the history, not timed
    p.record(_result(2.0), 2e-3, 0.5)
    p.record(_result(1.0), 3e-3, 0.25)
    p.add_stages({"data": 0.01, "forward": 0.2})
    p.add_stages({})  # a step that was not sampled
    assert p.history.loss == [3.0, 2.0, 1.0] and p.history.lr == [1e-3, 2e-3, 3e-3]
    assert p.timed_steps == 2 and p.samples_per_s(64) == 64 * 2 / 0.75
    assert p.stage_samples == 1 and p.step_time_ms() == {"data": 10.0, "forward": 200.0, "step": 375.0}
    again = RunProgress.from_state_dict(p.state_dict())
    assert again == p


def test_stage_clock_measures_only_sampled_steps():
    timer = WallTimer(cuda_sync=False)
    off = StageClock(torch.device("cpu"), False, timer)
    off.mark("data")
    assert off.measured() == {} and timer.active is False
    on = StageClock(torch.device("cpu"), True, timer)
    with timer.stage("route"):
        pass
    on.mark("data")
    on.mark("forward")
    got = on.measured()
    assert set(got) == {"data", "forward", "route"} and all(v >= 0 for v in got.values())


def test_all_to_all_bytes_per_step():
    c = CommCounter()
    c.record(torch.zeros(4, 3), [1, 3], 0, "forward")
    c.record(torch.zeros(4, 3), [2, 2], 1, "backward")
    assert a2a_per_step(c, 2) == {"total": 96 / 2, "offrank": (36 + 24) / 2, "forward": 24.0, "backward": 24.0,
                                  "calls": 1.0}
    nodes = CommCounter(node_size=2)  # ranks 0, 1 on node 0; 2, 3 on node 1
    span = Span(0, 0.0, nodes)
    nodes.record(torch.zeros(4, 3), [1, 0, 2, 1], 0, "forward", [0, 1, 2, 3])
    assert a2a_per_step(nodes, 1)["cross_node"] == 3 * 12 and span.a2a_bytes(nodes)["cross_node"] == 3 * 12
    assert "cross_node" not in a2a_per_step(c, 2) and "cross_node" not in Span(0, 0.0, c).a2a_bytes(c)


def test_interval_coverage_of_expert_choice_layers_only():
    """IntervalStats: the share of patches taken by 0..4+ experts, averaged over the interval's steps and
    the ranks, reported for the expert-choice layers and only for them (the record's patch_coverage)."""
    from types import SimpleNamespace

    from moe.balance import RoutingStats
    from training.metrics.interval import IntervalStats, interval_record

    def stats(coverage):
        z = torch.zeros(())
        return RoutingStats(torch.ones(4), torch.ones(4), z, torch.tensor(2.0), 8, z, z, z, z, coverage=coverage)

    iv = IntervalStats()
    for shares in ([0.25, 0.5, 0.25, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0, 0.0]):
        iv.add(SimpleNamespace(fusion_weights=torch.ones(2, 3), moe_stats=[stats(None), stats(torch.tensor(shares))]))
    reduced = iv.packed() * 2  # what an all-reduce over 2 ranks holding the same gives
    got = iv.unpack(reduced, world_size=2)
    assert got["coverage"][0] is None
    assert got["coverage"][1] == pytest.approx([0.125, 0.5, 0.375, 0.0, 0.0])
    rec = interval_record(step=2, result=_result(1.0), lr=0.1, seconds=1.0, steps=2,
                          total_steps=4, samples_per_step=8, stages_s={}, layer_names=["block0", "block1"],
                          load=got["load"], dropped=got["dropped"], active=got["active"], a2a_bytes={},
                          coverage=got["coverage"])
    assert rec["patch_coverage"] == {"block1": pytest.approx([0.125, 0.5, 0.375, 0.0, 0.0])}

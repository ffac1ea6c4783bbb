"""The bad-step guard and the expert-collapse detector (training/guards.py), by hand."""

from training.guards import BadStepGuard, CollapseDetector


def test_bad_step_guard_and_collapse_detector_by_hand():
    g = BadStepGuard(limit=2)
    assert not g.record(0, True) and not g.record(1, False) and not g.record(2, True) and g.record(3, True)
    assert g.skipped == [0, 2, 3]
    d = CollapseDetector(share=0.8, intervals=2, layer_names=["block1", "block3"])
    assert d.update(10, [[9, 1, 0, 0], [5, 5, 5, 5]]) == []
    assert d.update(20, [[1, 9, 0, 0], [5, 5, 5, 5]]) == []  # another expert: the streak restarts
    (msg,) = d.update(30, [[0, 10, 0, 0], [5, 5, 5, 5]])
    assert "expert collapse in block1: expert 1 took 100%" in msg and d.events[0]["step"] == 30
    assert d.update(40, [[0, 10, 0, 0], [5, 5, 5, 5]]) == []  # reported once per streak

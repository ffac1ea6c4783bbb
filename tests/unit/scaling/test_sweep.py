"""msmoe scale's sweep plan (scaling/sweep.py)."""

from scaling.sweep import Point, plan


def test_plan_skips_what_ep_cannot_divide_and_runs_one_rank_once():
    points, skipped = plan([1, 2, 4], [1, 2, 4], [4, 6], ["strong", "weak"])
    assert Point("strong", 1, 1, 4) in points and Point("weak", 1, 1, 4) not in points
    assert Point("weak", 4, 4, 4) in points and Point("strong", 2, 2, 6) in points
    assert all(p.world % p.ep == 0 and p.experts % p.ep == 0 for p in points)
    assert any("world 1, EP 2" in s for s in skipped) and any("EP 4" in s and "6 experts" in s for s in skipped)
    assert Point("weak", 2, 2, 4).overrides(8)[2] == "train.p=16"  # weak: the global batch grows with ranks
    assert Point("strong", 2, 2, 4).overrides(8)[2] == "train.p=8"

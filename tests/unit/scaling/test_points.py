"""The efficiency and one-level alpha-beta arithmetic of the scaling report (scaling/points.py) on hand-made points."""

import pytest

from scaling.comm_model import measured_preset
from scaling.projection import PROJECT_GPUS, cost_from_points, project
from scaling.points import AlphaBeta, efficiency, fit_alpha_beta
from tests.helpers import scale_record


def test_efficiency_by_hand():
    recs = [scale_record("strong", 1, 1, 4, 100.0), scale_record("strong", 2, 2, 4, 150.0),
            scale_record("weak", 2, 2, 4, 180.0)]
    eff = {(r["mode"], r["world"]): r["efficiency"] for r in efficiency(recs)}
    assert eff[("strong", 2)] == pytest.approx(150 / 200)  # 150 samples/s of an ideal 2 x 100
    assert eff[("weak", 2)] == pytest.approx(90 / 100)  # 90 per rank against 100 on one rank


def test_alpha_beta_fit_recovers_the_model_it_was_made_from():
    alpha, beta = 20e-6, 1 / 1e9  # 20 us per peer, 1 GB/s
    recs = []
    for ep, nbytes in ((2, 1e6), (4, 4e6), (8, 2e6), (2, 8e6)):
        calls = 8  # 4 forward all-to-alls (2 layers x dispatch/combine) + 4 backward
        per_call = nbytes / 4
        t = 4 * (alpha * (ep - 1) + beta * per_call * (ep - 1) / ep)
        recs.append(scale_record("strong", ep, ep, 8, 10.0, dispatch=1e3 * t / 2, combine=1e3 * t / 2,
                                 fwd_bytes=nbytes, calls=calls))
        # EP=1 twin: nothing to subtract
        recs.append(scale_record("strong", ep, 1, 8, 10.0, dispatch=0.0, combine=0.0))
    ab = fit_alpha_beta(recs)
    assert ab.alpha_s == pytest.approx(alpha, rel=1e-6) and ab.beta_s_per_byte == pytest.approx(beta, rel=1e-6)
    measured = measured_preset(ab.alpha_s, ab.beta_s_per_byte)
    proj = project(cost_from_points(recs, measured), measured)
    assert [p["gpus"] for p in proj] == list(PROJECT_GPUS) == [8, 16, 32, 64, 128, 256, 512, 1024]
    eff = [p["efficiency"] for p in proj]
    assert all(a >= b for a, b in zip(eff, eff[1:])) and 0 < eff[-1] < eff[0] <= 1  # latency term grows with p
    assert AlphaBeta(1.0, 0.0, 1, "").a2a_s(1, 1e9) == 0.0

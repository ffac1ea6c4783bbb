"""The report's projection and validation (scaling/projection.py) on hand-made points: held-out points
never enter the fit, compute from a run on another device, the layout decision by hand."""

import argparse
import dataclasses
import json

import pytest

from scaling.comm_model import PRESETS, Link, a2a_s, allreduce_s, measured_preset
from scaling.projection import StepCost, cost_from_points, cost_from_run, project, decide, layout_name, reference_point, step_s, validate
from scaling.sweep import ScaleError
from launcher.scale import _projection_spec
from tests.helpers import ALPHA, BETA, scale_point, validation_sweep_records as _sweep

def test_held_out_points_are_predicted_by_a_fit_that_never_saw_them():
    v = validate(_sweep(0.040), fit_max_world=2)
    assert v["fit_on"] == ["s w2 ep2 E4", "w w2 ep2 E4"] and v["twins_in_fit"] == ["s w2 ep1 E4", "w w2 ep1 E4"]
    ab = v["model"]
    assert ab.alpha_s == pytest.approx(ALPHA, rel=1e-6) and ab.beta_s_per_byte == pytest.approx(BETA, rel=1e-6)
    (row,) = v["rows"]
    assert row["point"] == "s w4 ep4 E4" and row["twin"] == "s w4 ep1 E4"
    pred_fwd = 4 * (ALPHA * 3 + BETA * 6e6 / 4 * 3 / 4)  # by hand: 4 forward calls at p = 4
    assert row["a2a_pred_ms"] == pytest.approx(1e3 * pred_fwd)
    assert row["a2a_meas_ms"] == pytest.approx(40.0)  # dispatch + combine minus the twin's 1 ms
    # step: the twin's measured 120 ms + all 8 calls of (12e6 / 8) bytes each
    assert row["step_pred_ms"] == pytest.approx(120.0 + 1e3 * 8 * (ALPHA * 3 + BETA * 1.5e6 * 3 / 4))
    # the held-out measurement moves the error, never the prediction
    other = validate(_sweep(0.080), fit_max_world=2)["rows"][0]
    assert other["a2a_pred_ms"] == row["a2a_pred_ms"] and other["a2a_meas_ms"] == pytest.approx(80.0)


def test_compute_from_the_points_by_hand():
    recs = _sweep(0.040)
    ab = validate(recs, fit_max_world=2)["model"]
    cost = cost_from_points(recs, measured_preset(ab.alpha_s, ab.beta_s_per_byte))
    # reference: the largest EP point (s w4 ep4): 16 samples over 4 ranks, 8 calls of 12e6 / 8 bytes
    assert cost.samples_per_rank == 4 and cost.calls == 8 and cost.bytes_per_call == 1.5e6
    assert cost.compute_s == pytest.approx(0.150 - 8 * (ALPHA * 3 + BETA * 1.5e6 * 3 / 4))
    h = PRESETS["h100-ndr"]
    p16 = project(cost, h)[1]
    assert p16["gpus"] == 16 and p16["samples_per_s"] == pytest.approx(16 * 4 / (1e-3 * p16["step_ms"]))


def test_validation_default_holds_out_the_largest_world_and_says_why_not():
    assert validate(_sweep(0.04))["fit_max_world"] == 2
    v = validate([scale_point("strong", 1, 1, 0), scale_point("strong", 2, 2, 4e6), scale_point("strong", 2, 1, 0)])
    assert v["model"] is None and "no point with EP >= 2 and at most 1 ranks" in v["why_not"]


def _cost(params=None, kf=2):
    return StepCost(compute_s=0.010, samples_per_rank=8, bytes_per_call=4e6, calls=8, expert_params_per_rank=params,
                    fine_slots=kf, source="test")


def test_layout_decision_by_hand():
    h = PRESETS["h100-ndr"]
    rows, changes = decide(_cost(params=2e6), h)
    one, two = rows[0], rows[1]
    assert len(set(round(v, 12) for v in one["efficiency"].values())) == 1  # one node: all layouts alike
    flat16 = 0.010 + 8 * a2a_s(h, "flat", 16, 4e6)
    local16 = 0.010 + 8 * a2a_s(h, "node-local", 16, 4e6, 2)
    # EP = 8 on 16 GPUs: 2 replicas of twice the experts, their fp32 gradients ring-all-reduced over NDR
    ep8 = 0.010 + 8 * a2a_s(h, "flat", 8, 4e6) + allreduce_s(h.inter, 2, 2e6 * 2 * 4)
    assert two["efficiency"][layout_name("flat", "all")] == pytest.approx(0.010 / flat16)
    assert two["efficiency"][layout_name("node-local", "all")] == pytest.approx(0.010 / local16)
    assert two["efficiency"][layout_name("flat", "node")] == pytest.approx(0.010 / ep8)
    assert step_s(_cost(params=2e6), h, 16, 8, "flat")[0] == pytest.approx(ep8)
    best = max(two["efficiency"], key=two["efficiency"].get)
    assert two["best"] == best
    # node-local sends half the cross-node bytes (Kf = 2) and fewer IB peers: ahead from 2 nodes on
    assert all(r["efficiency"][layout_name("node-local", "all")] > r["efficiency"][layout_name("flat", "all")]
               for r in rows[1:])
    assert changes[0] == ("h100-ndr: node-local, EP=GPUs beats flat, EP=GPUs at 2 nodes and up to 128 nodes")
    # a huge expert gradient to all-reduce: EP = GPUs/node loses from 2 nodes; tiny: it wins
    big = decide(_cost(params=1e9), h)[1][1]
    small = decide(_cost(params=1.0), h)[1][1]
    assert big.startswith("h100-ndr: flat, EP=GPUs/node does not beat flat, EP=GPUs at 2 nodes")
    assert small.startswith("h100-ndr: flat, EP=GPUs/node beats flat, EP=GPUs at 2 nodes")


def test_compute_from_a_gpu_run(tmp_path):
    recs = _sweep(0.04)
    ref = reference_point(recs)
    base = _cost()
    summary = {"step_time_ms": {"step": 12.5}, "world_size": 1, "ep_size": 1, "device": "cuda:0",
               "config": {"train": {"p": 16, "k": 4, "precision": "bf16"}, "model": {"dim": 512}}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    c = cost_from_run(str(path), base, {**ref, "model_config": {"dim": 64}, "precision": "fp32"})
    assert c.compute_s == pytest.approx(0.0125) and c.samples_per_rank == 64
    assert c.bytes_per_call == pytest.approx(4e6 * 64 / 8 * 0.5)  # 8x the samples, bf16 rows
    assert "cuda:0" in c.source and any("differs from the swept one in dim" in x for x in c.caveats)
    path.write_text(json.dumps({**summary, "ep_size": 2}))
    with pytest.raises(ValueError, match="ep_size=2; give an EP=1 run"):
        cost_from_run(str(path), base, ref)
    path.write_text(json.dumps({"steps": 3}))
    with pytest.raises(ValueError, match="not a msmoe train summary.json"):
        cost_from_run(str(path), base, ref)


def test_report_flags_are_checked_before_anything_runs(tmp_path):
    ns = dict(preset="h100-ndr", compute_from=None, fit_max_world=None, fine_slots=None, node=[])
    assert _projection_spec(argparse.Namespace(**ns)).presets == ("h100-ndr",)
    (ours,) = _projection_spec(argparse.Namespace(**{**ns, "preset": "", "node": ["ours=4,1.5,2000,6,350"]})).nodes
    assert (ours.name, ours.gpus_per_node, ours.intra, ours.inter) == ("ours", 4, Link(1.5, 2000.0), Link(6.0, 350.0))
    for bad in ("ours=4,1.5,2000,6", "ours=4,1.5,2000,6,0", "h100-ndr=8,1,1,1,1", "=8,1,1,1,1"):
        with pytest.raises(ScaleError, match="--node"):
            _projection_spec(argparse.Namespace(**{**ns, "node": [bad]}))
    with pytest.raises(ScaleError, match="--preset 'h100-nd'"):
        _projection_spec(argparse.Namespace(**{**ns, "preset": "h100-nd"}))
    with pytest.raises(ScaleError, match="--fit-max-world 0"):
        _projection_spec(argparse.Namespace(**{**ns, "fit_max_world": 0}))
    with pytest.raises(FileNotFoundError, match="--compute-from .*nope.json: no such file"):
        _projection_spec(argparse.Namespace(**{**ns, "compute_from": str(tmp_path / "nope.json")}))


def test_the_dense_gradient_all_reduce_is_in_the_projected_step():
    h = PRESETS["h100-ndr"]
    bare, dense = _cost(params=2e6), dataclasses.replace(_cost(params=2e6), dense_params=5e6)
    for gpus in (8, 16, 64):
        (s0, a0, r0), (s1, a1, r1) = step_s(bare, h, gpus, gpus, "flat"), step_s(dense, h, gpus, gpus, "flat")
        link = h.inter if gpus > h.gpus_per_node else h.intra  # one node: NVLink; more: the NIC
        assert a1 == a0 and r1 - r0 == pytest.approx(allreduce_s(link, gpus, 5e6 * 4))
        assert s1 - s0 == pytest.approx(allreduce_s(link, gpus, 5e6 * 4))
    assert step_s(dense, h, 1, 1, "flat")[2] == 0.0

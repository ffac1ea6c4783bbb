"""The emulated cluster's link model (scaling/cluster_fit.py): points made by a known model are
recovered by the fit on 1 and 2 nodes, the 4-node points predicted from it; the ring all-reduce
(dense and expert gradients) by hand; what cannot be fitted is named."""

import pytest

from scaling.cluster_fit import (ClusterLinks, Compute, PointView, a2a_parts, allreduce_s, fit_links, held_out,
                                 predict, ring_allreduce_s, rings)

N = 2  # ranks per node
TRUE = ClusterLinks(alpha_s=0.0, beta_s_per_byte=2e-9, node_link_bps=100e6, nproc_per_node=N,
                    compute=Compute(c0_s=0.020, c1_s=0.050, w_ref=2))
DENSE, EXPERT = 40_000, 16_000
FWD_BYTES = 80_000.0  # per rank and forward call at every point (weak scaling: the per-rank batch fixed)


def record(world, ep, links=TRUE, stage_base_ms=1.0, a2a_scale=1.0, step_scale=1.0):
    """A points.jsonl record whose times follow ``links`` (times ``a2a_scale`` / ``step_scale``)."""
    calls = 4.0 if ep > 1 else 0.0
    r = {"mode": "weak", "world_size": world, "ep_size": ep, "num_experts": 8, "nodes": world // N,
         "cluster": {"nodes": world // N, "nproc_per_node": N, "link_mbit": 100.0},
         "dense_params": DENSE, "expert_params": EXPERT,
         "a2a_bytes_per_step": {"forward": FWD_BYTES * calls / 2, "backward": FWD_BYTES * calls / 2,
                                "total": FWD_BYTES * calls, "calls": calls},
         "step_time_ms": {"step": 0.0, "dispatch": stage_base_ms / 2, "combine": stage_base_ms / 2}}
    pred = predict(links, PointView.of(r))
    r["step_time_ms"]["dispatch"] += 1e3 * pred["a2a_s"] * a2a_scale / 2
    r["step_time_ms"]["combine"] += 1e3 * pred["a2a_s"] * a2a_scale / 2
    r["step_time_ms"]["step"] = 1e3 * pred["step_s"] * step_scale
    return r


def sweep(**big):
    small = [record(2, 1), record(2, 2), record(4, 1), record(4, 2), record(4, 4)]
    return small + [record(8, ep, **big) for ep in (1, 2, 4, 8)]


def test_the_fit_recovers_a_known_link_from_one_and_two_nodes():
    fit = fit_links(sweep(a2a_scale=3.0, step_scale=2.0), max_nodes=2)  # the 4-node points never enter it
    got = fit.links
    assert got.node_link_bps == pytest.approx(100e6, rel=1e-6)
    assert got.beta_s_per_byte == pytest.approx(2e-9, rel=1e-6)
    assert (got.compute.c0_s, got.compute.c1_s) == pytest.approx((0.020, 0.050), rel=1e-6)
    assert fit.shaped_mbit == 100.0 and all("8" not in label.split()[1] for label in fit.fit_on)


def test_held_out_points_are_predicted_and_their_measurement_moves_only_the_error():
    exact = held_out(sweep(), max_nodes=2)
    rows = {r["ep"]: r for r in exact["rows"]}
    assert sorted(rows) == [1, 2, 4, 8] and all(r["nodes"] == 4 for r in rows.values())
    for r in rows.values():
        assert r["step_pred_ms"] == pytest.approx(r["step_meas_ms"], rel=1e-6)
        if r["ep"] > 1:
            assert r["a2a_pred_ms"] == pytest.approx(r["a2a_meas_ms"], rel=1e-6)
    assert rows[1]["a2a_pred_ms"] is None and rows[1]["dense_ar_ms"] > 0
    assert rows[1]["expert_ar_ms"] > 0 and rows[8]["expert_ar_ms"] == 0  # EP=1: every expert on all 8 ranks
    off = held_out(sweep(a2a_scale=1.5, step_scale=1.1), max_nodes=2)
    for a, b in zip(exact["rows"], off["rows"]):
        assert a["step_pred_ms"] == pytest.approx(b["step_pred_ms"]) and b["step_meas_ms"] == pytest.approx(
            1.1 * a["step_meas_ms"])
    assert {r["ep"]: r for r in off["rows"]}[8]["a2a_meas_ms"] == pytest.approx(1.5 * rows[8]["a2a_meas_ms"], rel=1e-6)


def test_a2a_parts_by_hand():
    # W=8, P=8, n=2: 1 intra peer (B/8), 6 remote peers (6B/8); both ranks of a node send through its link
    cpu, link = a2a_parts(TRUE, 8, 8, 80_000)
    s8 = (0.020 + 0.050 * 8) / (0.020 + 0.050 * 2)
    assert cpu == pytest.approx(s8 * 2e-9 * 10_000)
    assert link == pytest.approx(2 * 60_000 * 8 / 100e6)
    assert a2a_parts(TRUE, 8, 2, 80_000)[1] == 0.0  # EP=2 groups sit inside a node


def test_ring_allreduce_by_hand_dense_and_expert():
    assert rings(4, 1, "dense") == [[0, 1, 2, 3]] and rings(8, 2, "expert") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert rings(8, 8, "expert") == [] and rings(1, 1, "dense") == []
    s4 = TRUE.compute.oversubscription(4)
    # dense over 4 ranks on 2 nodes: one ring edge leaves each node; 6 steps of nbytes / 4
    nbytes = DENSE * 4
    per_step = max(s4 * 2e-9 * nbytes / 4, nbytes / 4 * 8 / 100e6)
    assert ring_allreduce_s(TRUE, 4, rings(4, 1, "dense"), nbytes) == pytest.approx(6 * per_step)
    # expert replicas at W=8, P=2: two rings, every edge leaves its node, both rings through each node's link
    eb = EXPERT / 2 * 4
    s8 = TRUE.compute.oversubscription(8)
    per_step = max(s8 * 2e-9 * eb / 4, 2 * eb / 4 * 8 / 100e6)
    dense, expert = allreduce_s(TRUE, 8, 2, DENSE, EXPERT)
    assert expert == pytest.approx(6 * per_step) and dense > 0
    # one node: no link, only the CPU side
    assert allreduce_s(TRUE, 2, 1, DENSE, EXPERT)[0] == pytest.approx(2 * TRUE.compute.oversubscription(2) * 2e-9
                                                                     * DENSE * 4 / 2)


def test_the_dense_all_reduce_is_in_the_step():
    r = PointView.of(record(8, 8))
    pred = predict(TRUE, r)
    assert pred["dense_ar_s"] > 0 and pred["expert_ar_s"] == 0
    assert pred["step_s"] == pytest.approx(pred["compute_s"] + pred["a2a_step_s"] + pred["dense_ar_s"])
    fat = PointView.of({**record(8, 8), "dense_params": 4 * DENSE})
    assert predict(TRUE, fat)["dense_ar_s"] == pytest.approx(4 * pred["dense_ar_s"])


def test_what_cannot_be_fitted_is_named():
    with pytest.raises(ValueError, match="a point on 2\\+ nodes with EP > 2"):
        fit_links([record(2, 1), record(2, 2), record(4, 1), record(4, 2)])
    with pytest.raises(ValueError, match="was it measured by `msmoe scale --cluster`"):
        PointView.of({**record(2, 2), "cluster": None, "nodes": None})

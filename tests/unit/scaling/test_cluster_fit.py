"""The emulated cluster's link model (scaling/cluster_fit.py): points made by a known model are
recovered by the fit on 1 and 2 nodes and the 4-node points predicted from it (a wrong measurement
moves the error, never the prediction); the ring all-reduce of the dense and expert gradients by
hand; what cannot be fitted is named."""

import pytest

from scaling.cluster_fit import (ClusterLinks, CpuLevel, PointView, a2a_parts, allreduce_s, comm_s, fit_links,
                                 held_out, node_link_bytes, predict, ring_allreduce_s, rings)

N = 2  # ranks per node
TRUE = ClusterLinks(cpu={2: CpuLevel(0.0, 2e-8, 0), 4: CpuLevel(3e-4, 5e-8, 0), 8: CpuLevel(6e-4, 5e-8, 0)},
                    node_link_bps=100e6, nproc_per_node=N)
DENSE, EXPERT = 200_000, 16_000
FWD_BYTES = 80_000.0  # per rank and forward call at every point (weak scaling: the per-rank batch fixed)


def record(nodes, world, ep, step_ms=0.0, a2a_scale=1.0):
    """A points.jsonl record whose forward all-to-all follows TRUE (times ``a2a_scale``)."""
    calls = 4.0 if ep > 1 else 0.0
    r = {"mode": "weak", "world_size": world, "ep_size": ep, "num_experts": 8, "nodes": nodes,
         "cluster": {"nodes": nodes, "nproc_per_node": world // nodes, "link_mbit": 100.0},
         "dense_params": DENSE, "expert_params": EXPERT,
         "a2a_bytes_per_step": {"forward": FWD_BYTES * calls / 2, "backward": FWD_BYTES * calls / 2,
                                "total": FWD_BYTES * calls, "calls": calls},
         "step_time_ms": {"step": step_ms, "dispatch": 0.5, "combine": 0.5}}
    cpu, link = a2a_parts(TRUE, world, ep, FWD_BYTES, nodes)
    r["step_time_ms"]["dispatch"] += 1e3 * calls / 2 * (cpu + link) * a2a_scale
    return r


def sweep(big_a2a_scale=1.0, big_step_scale=1.0):
    """One-node points at W = 2, 4, 8 (their steps made up), 2- and 4-node points whose steps follow the model."""
    layout = ((2, (1, 2)), (4, (1, 2, 4)), (8, (1, 2, 4, 8)))
    one = {(w, ep): record(1, w, ep, step_ms=30.0 + 12.0 * w + 5.0 * ep) for w, eps in layout for ep in eps}
    out = list(one.values())
    for nodes, scale_a2a, scale_step in ((2, 1.0, 1.0), (4, big_a2a_scale, big_step_scale)):
        w = nodes * N
        for ep in (1, 2, 4, 8):
            if ep > w:
                continue
            r = record(nodes, w, ep, a2a_scale=scale_a2a)
            twin = one[(w, ep)]
            model = predict(TRUE, PointView.of(r), PointView.of(twin))["step_s"]
            r["step_time_ms"]["step"] = 1e3 * model * scale_step
            out.append(r)
    return out


def test_the_fit_recovers_a_known_link_from_one_and_two_nodes():
    fit = fit_links(sweep(big_a2a_scale=3.0, big_step_scale=2.0), max_nodes=2)  # 4-node points never enter it
    got = fit.links
    assert got.node_link_bps == pytest.approx(100e6, rel=1e-9) and fit.shaped_mbit == 100.0
    for w, lv in TRUE.cpu.items():
        assert (got.cpu[w].alpha_s, got.cpu[w].beta_s_per_byte) == pytest.approx((lv.alpha_s, lv.beta_s_per_byte),
                                                                                  rel=1e-9, abs=1e-15)
    assert got.oversubscription(8) == pytest.approx(2.5)  # 5e-8 / 2e-8
    assert fit.link_fit_on == ("w w4 ep4 E8 n2",) and not [x for x in fit.cpu_fit_on if not x.endswith("n1")]


def test_held_out_points_are_predicted_and_their_measurement_moves_only_the_error():
    exact = held_out(sweep(), max_nodes=2)
    rows = {r["ep"]: r for r in exact["rows"]}
    assert sorted(rows) == [1, 2, 4, 8] and {r["nodes"] for r in rows.values()} == {4}
    for r in rows.values():
        assert r["step_pred_ms"] == pytest.approx(r["step_meas_ms"], rel=1e-9)
        if r["ep"] > 1:
            assert r["a2a_pred_ms"] == pytest.approx(r["a2a_meas_ms"], rel=1e-9)
    assert rows[1]["a2a_pred_ms"] is None and rows[2]["a2a_link_ms"] == 0.0 < rows[4]["a2a_link_ms"]
    off = held_out(sweep(big_a2a_scale=1.5, big_step_scale=1.1), max_nodes=2)
    for a, b in zip(exact["rows"], off["rows"]):
        assert a["step_pred_ms"] == pytest.approx(b["step_pred_ms"]) and a["a2a_pred_ms"] == b["a2a_pred_ms"]
        assert b["step_meas_ms"] == pytest.approx(1.1 * a["step_meas_ms"])
    assert {r["ep"]: r for r in off["rows"]}[8]["a2a_meas_ms"] == pytest.approx(1.5 * rows[8]["a2a_meas_ms"], rel=1e-6)


def test_a2a_parts_by_hand():
    # W=8, P=8 on 4 nodes of 2: 7 peers, 7/8 of B off the rank; 6/8 of B to other nodes, through the link x 2 ranks
    cpu, link = a2a_parts(TRUE, 8, 8, 80_000, nodes=4)
    assert cpu == pytest.approx(6e-4 * 7 + 5e-8 * 70_000)
    assert link == pytest.approx(2 * 60_000 * 8 / 100e6)
    assert a2a_parts(TRUE, 8, 2, 80_000, nodes=4)[1] == 0.0  # EP=2 groups sit inside a node
    assert a2a_parts(TRUE, 8, 8, 80_000, nodes=1) == (pytest.approx(cpu), 0.0)  # the one-node twin: no link


def test_ring_allreduce_by_hand_dense_and_expert():
    assert rings(4, 1, "dense") == [[0, 1, 2, 3]] and rings(8, 2, "expert") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert rings(8, 8, "expert") == [] and rings(1, 1, "dense") == []
    # dense over 4 ranks on 2 nodes: one ring edge leaves each node; 6 steps of nbytes / 4
    nbytes = DENSE * 4
    per_step = max(3e-4 + 5e-8 * nbytes / 4, nbytes / 4 * 8 / 100e6)
    assert ring_allreduce_s(TRUE, 4, rings(4, 1, "dense"), nbytes, nodes=2) == pytest.approx(6 * per_step)
    assert ring_allreduce_s(TRUE, 4, rings(4, 1, "dense"), nbytes, nodes=1) == pytest.approx(
        6 * (3e-4 + 5e-8 * nbytes / 4))
    # expert replicas at W=8, P=2 on 4 nodes: two rings, every edge leaves its node, both through each node's link
    eb = EXPERT / 2 * 4
    per_step = max(6e-4 + 5e-8 * eb / 4, 2 * eb / 4 * 8 / 100e6)
    dense, expert = allreduce_s(TRUE, 8, 2, DENSE, EXPERT, nodes=4)
    assert expert == pytest.approx(6 * per_step) and dense > 0
    assert allreduce_s(TRUE, 8, 8, DENSE, EXPERT, nodes=4)[1] == 0.0  # EP = world: no replicas


def test_the_dense_all_reduce_is_in_the_step():
    p, twin = PointView.of(record(4, 8, 8)), PointView.of(record(1, 8, 8, step_ms=200.0))
    pred = predict(TRUE, p, twin)
    dense_4, _ = allreduce_s(TRUE, 8, 8, DENSE, EXPERT, nodes=4)
    dense_1, _ = allreduce_s(TRUE, 8, 8, DENSE, EXPERT, nodes=1)
    assert dense_4 > dense_1 > 0 and pred["dense_ar_s"] == dense_4
    link = a2a_parts(TRUE, 8, 8, FWD_BYTES, nodes=4)[1]
    assert pred["step_s"] == pytest.approx(0.200 + 4 * link + dense_4 - dense_1)
    fat = PointView.of({**record(4, 8, 8), "dense_params": 4 * DENSE})
    fat_twin = PointView.of({**record(1, 8, 8, step_ms=200.0), "dense_params": 4 * DENSE})
    assert predict(TRUE, fat, fat_twin)["step_s"] - pred["step_s"] == pytest.approx(
        comm_s(TRUE, fat, 4) - comm_s(TRUE, p, 4) - comm_s(TRUE, fat_twin, 1) + comm_s(TRUE, twin, 1))
    assert predict(TRUE, fat, fat_twin)["step_s"] > pred["step_s"]


def test_what_cannot_be_fitted_is_named():
    with pytest.raises(ValueError, match="whose exchange crosses nodes"):
        fit_links([record(1, 2, 1), record(1, 2, 2), record(2, 4, 1), record(2, 4, 2)])
    with pytest.raises(ValueError, match="the CPU level"):
        fit_links([record(2, 4, 1), record(2, 4, 4)])
    with pytest.raises(ValueError, match="was it measured by `msmoe scale --cluster`"):
        PointView.of({**record(1, 2, 2), "cluster": None, "nodes": None})
    recs = [r for r in sweep() if not (r["nodes"] == 1 and r["world_size"] == 8 and r["ep_size"] == 4)]
    with pytest.raises(ValueError, match="no one-node twin \\(world 8, EP 4 on one node\\)"):
        held_out(recs)


def test_the_busiest_node_link_from_the_measured_expert_load():
    # EP=4 on 2 nodes of 2, 8 experts (2 per rank): node 0 holds experts 0-3, node 1 experts 4-7
    even = node_link_bytes(2, 4, 1000.0)
    assert even == node_link_bytes(2, 4, 1000.0, [1 / 8] * 8) == pytest.approx(2 * 1000 * 2 / 4)
    hot = [0.05] * 4 + [0.2] * 4  # 80 % of the rows go to node 1: 2 ranks x 1000 x 0.8 come in
    assert node_link_bytes(2, 4, 1000.0, hot) == pytest.approx(1600.0)
    assert node_link_bytes(2, 2, 1000.0, hot) == 0.0  # EP groups inside a node
    # EP=8 on 4 nodes, one expert per rank: node 2 (experts 4, 5) receives 6 ranks x B x its share
    load = [0.1, 0.1, 0.05, 0.05, 0.1, 0.3, 0.15, 0.15]
    assert node_link_bytes(2, 8, 1000.0, load) == pytest.approx(6 * 1000 * 0.4)
    r = record(4, 8, 8)
    skewed = PointView.of({**r, "expert_load_fraction": {"block1": load}})
    assert a2a_parts(TRUE, 8, 8, FWD_BYTES, 4, skewed.load)[1] == pytest.approx(6 * FWD_BYTES * 0.4 * 8 / 100e6)
    assert fit_links(sweep(), even_routing=True).links.node_link_bps == pytest.approx(100e6)


def test_the_cpu_side_of_a_held_out_exchange_is_its_one_node_twins_measurement():
    p, twin = PointView.of(record(4, 8, 8)), PointView.of(record(1, 8, 8, step_ms=200.0))
    link = a2a_parts(TRUE, 8, 8, FWD_BYTES, 4)[1]
    assert predict(TRUE, p, twin, twin_a2a_s=0.050)["a2a_s"] == pytest.approx(0.050 + 2 * link)
    assert predict(TRUE, p, twin)["a2a_s"] == pytest.approx(2 * sum(a2a_parts(TRUE, 8, 8, FWD_BYTES, 4)))

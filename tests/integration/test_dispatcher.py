"""Expert-parallel PatchMoE (parallel/dispatcher.py) under torchrun (gloo) against the single-process reference."""

import math

import pytest
import torch

from tests.helpers import run_torchrun

OVERLAP_ATOL = 1e-6  # overlap n vs 1: fp32, each chunk's rows in their own grouped matmul

CASES = [
    # nproc, ep_size, capacity_factor, expert kind
    (2, 1, None, "seed"),
    (2, 2, None, "seed"),
    (2, 2, 0.5, "seed"),
    (2, 2, None, "conv"),
    (4, 2, None, "ffn"),
    (4, 2, 0.75, "seed"),
    (4, 4, None, "seed"),
    (4, 4, 0.5, "ffn"),
    (2, 2, None, "seed", "bf16"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_ep_layer_matches_reference(tmp_path, case):
    nproc, ep, cf, kind, dtype = (*case, "fp32")[:5]
    tol = 1e-5 if dtype == "fp32" else 3e-2  # bf16: experts batch rows of several ranks together
    args = ["--ep-size", str(ep), "--kind", kind, "--dtype", dtype] + (["--capacity-factor", str(cf)] if cf else [])
    reports, _ = run_torchrun("ep_layer_check.py", nproc, args, str(tmp_path))
    for r in reports:
        assert r["ep_size"] == ep and r["edp_size"] == nproc // ep
        for name, e in r["errors"].items():
            assert e < tol, f"rank {r['rank']}: {name} relative error {e:.2e}"
        assert r["load"] == r["ref_load"] and r["kept"] == r["ref_kept"]
    # rank 0 routed nothing to expert 7; rank 3 (4 procs) had no patches at all
    assert reports[0]["load"][7] == 0
    if nproc == 4:
        assert reports[3]["num_units"] == 0
    if cf is not None:
        assert any(r["dropped_fraction"] > 0 for r in reports), "capacity case should overflow"
    # bytes: each payload row is a whole patch (P*P*C fp32); dispatch + combine move every
    # kept slot exactly once each way, both in forward and in backward
    fwd = sum(r["bytes_forward"] for r in reports)
    assert fwd == sum(r["analytic_forward"] for r in reports)
    assert sum(r["bytes_backward"] for r in reports) == fwd
    if cf is None:
        assert fwd == sum(r["analytic_dropless"] for r in reports)
        assert fwd == sum(r["analytic_topk"] for r in reports)  # static top-k: K live slots per patch


@pytest.mark.slow
@pytest.mark.parametrize("nproc,ep", [(2, 2), (4, 4)])
def test_dynamic_top_p_under_ep(tmp_path, nproc, ep):
    """Top-p: a variable number of experts per patch, so variable per-rank send counts."""
    reports, _ = run_torchrun("ep_layer_check.py", nproc, ["--ep-size", str(ep), "--top-p", "0.3"], str(tmp_path))
    for r in reports:
        for name, e in r["errors"].items():
            assert e < 1e-5, f"rank {r['rank']}: {name} relative error {e:.2e}"
        assert r["load"] == r["ref_load"]
    active = [r["active_experts"] for r in reports if r["num_units"]]
    assert all(1 <= a <= 4 for a in active) and len(set(active)) > 1  # differs across ranks
    fwd = sum(r["bytes_forward"] for r in reports)
    assert fwd == sum(r["analytic_dropless"] for r in reports)  # exactly the live slots move
    assert fwd != sum(r["analytic_topk"] for r in reports)


@pytest.mark.slow
def test_patch_pruning_under_ep(tmp_path):
    """Dual sparsity at keep fraction 1/3: a third of the patches are routed, and the all-to-all
    carries a third of the unpruned bytes; EP layer still equals its reference (scorer included)."""
    full, _ = run_torchrun("ep_layer_check.py", 4, ["--ep-size", "2"], str(tmp_path / "full"))
    third, _ = run_torchrun("ep_layer_check.py", 4, ["--ep-size", "2", "--keep-fraction", str(1 / 3)],
                            str(tmp_path / "third"))
    for r in third:
        for name, e in r["errors"].items():
            assert e < 1e-5, f"rank {r['rank']}: {name} relative error {e:.2e}"
        assert "scorer_grad" in r["errors"]
    for a, b in zip(full, third):
        assert 3 * b["num_units"] == a["num_units"] and b["pruned_units"] == a["num_units"] - b["num_units"]
    bytes_full = sum(r["bytes_forward"] + r["bytes_backward"] for r in full)
    bytes_third = sum(r["bytes_forward"] + r["bytes_backward"] for r in third)
    assert 3 * bytes_third == bytes_full


@pytest.mark.slow
@pytest.mark.parametrize("nproc,ep,cf", [(2, 2, None), (4, 2, 0.5)])
def test_expert_choice_under_ep(tmp_path, nproc, ep, cf):
    """Expert choice: every expert takes exactly C of each rank's patches (C from that rank's own
    patch count; the 4th rank has none), so the all-to-all carries E * C rows per rank each way;
    the EP layer equals the single-process layer run on each rank's batch."""
    args = ["--ep-size", str(ep), "--choice", "expert"] + (["--capacity-factor", str(cf)] if cf else [])
    reports, _ = run_torchrun("ep_layer_check.py", nproc, args, str(tmp_path))
    for r in reports:
        for name, e in r["errors"].items():
            assert e < 1e-5, f"rank {r['rank']}: {name} relative error {e:.2e}"
        assert r["load"] == r["ref_load"] and r["coverage"] == r["ref_coverage"]
        n, e = r["num_units"], len(r["load"])
        c = min(n, max(1, math.ceil((cf or 1.0) * n * 2 / e)))  # K = 2
        assert r["load"] == [c] * e and r["dropped_fraction"] == 0.0
    fwd = sum(r["bytes_forward"] for r in reports)
    assert fwd == sum(r["analytic_forward"] for r in reports)
    assert sum(r["bytes_backward"] for r in reports) == fwd


@pytest.mark.slow
@pytest.mark.parametrize("choice,cf", [("expert", None), ("expert", 0.5), ("token", 0.75)])
def test_static_plans_under_ep_need_no_count_exchange(tmp_path, choice, cf):
    """Equal shards and a dispatcher told so: expert choice and capacity mode (padded to [E, C])
    exchange exactly E * C rows per rank each way with split sizes known on the host: the layer's
    forward and backward make no host read at all, and the result equals the reference."""
    args = ["--ep-size", "2", "--choice", choice, "--uniform"] + (["--capacity-factor", str(cf)] if cf else [])
    reports, _ = run_torchrun("ep_layer_check.py", 4, args, str(tmp_path))
    row_bytes = 4 * 4 * 8 * 4  # P * P * C fp32
    for r in reports:
        for name, e in r["errors"].items():
            assert e < 1e-5, f"rank {r['rank']}: {name} relative error {e:.2e}"
        assert r["load"] == r["ref_load"] and r["kept"] == r["ref_kept"]
        assert r["host_syncs"] == 0, r["sync_sites"]
        n, e = r["num_units"], len(r["load"])
        c = max(1, math.ceil((cf or 1.0) * n * 2 / e))  # K = 2
        assert r["bytes_forward"] == r["bytes_backward"] == 2 * e * c * row_bytes  # padded rows included
    if choice == "token":
        assert any(r["dropped_fraction"] > 0 for r in reports)


@pytest.mark.slow
@pytest.mark.parametrize("choice,cf", [("expert", None), ("token", 1.0)])
def test_overlap_chunks_equal_one_chunk(tmp_path, choice, cf):
    """overlap_chunks 2 and 4 (the exchange pipelined in chunks of local experts, asynchronous
    all-to-alls, parallel/overlap.py) against 1: the same outputs, input gradients and expert
    gradients (bound OVERLAP_ATOL: fp32, the experts' matmuls grouped by chunk), each also equal to
    the single-process reference, and exactly the same bytes both ways."""
    base = ["--ep-size", "2", "--choice", choice, "--uniform"] + (["--capacity-factor", str(cf)] if cf else [])
    runs = {}
    for n in (1, 2, 4):
        reports, _ = run_torchrun("ep_layer_check.py", 2, base + ["--overlap-chunks", str(n)], str(tmp_path / f"n{n}"))
        for r in reports:
            for name, e in r["errors"].items():
                assert e < 1e-5, f"n={n} rank {r['rank']}: {name} relative error {e:.2e}"
            assert r["host_syncs"] == 0, r["sync_sites"]
        runs[n] = reports
    for n in (2, 4):
        for r1, rn in zip(runs[1], runs[n]):
            assert (rn["bytes_forward"], rn["bytes_backward"]) == (r1["bytes_forward"], r1["bytes_backward"])
            one = torch.load(tmp_path / "n1" / f"tensors_rank{r1['rank']}.pt")
            got = torch.load(tmp_path / f"n{n}" / f"tensors_rank{rn['rank']}.pt")
            torch.testing.assert_close(got["out"], one["out"], rtol=0, atol=OVERLAP_ATOL)
            torch.testing.assert_close(got["x_grad"], one["x_grad"], rtol=0, atol=OVERLAP_ATOL)
            for name in one["experts"]:
                torch.testing.assert_close(got["experts"][name], one["experts"][name], rtol=0, atol=OVERLAP_ATOL,
                                           msg=name)

"""Host syncs per training step, counted under torchrun on CPU (tests/dist/sync_count_check.py with
gpucheck/host_syncs.py): within the budget of one per dispatching MoE layer and one per step
(the counter and single layers: tests/unit/gpucheck/test_host_syncs.py); the node-local transport's
two all-to-alls read their split sizes once each."""

import os
import tempfile

import pytest

from tests.helpers import TINY_DATA, run_torchrun


def _step_syncs(tmp, nproc, *overrides):
    out = os.path.join(tmp, "out")
    os.makedirs(out)
    reports, _ = run_torchrun("sync_count_check.py", nproc,
                              [f"data.path={tmp}/data", f"out_dir={tmp}/runs", *overrides], out)
    return reports


def _assert_budget(reports):
    for r in reports:
        budget = r["moe_layers"] + 1
        assert max(r["per_step"]) <= budget, (r["per_step"], budget, r["sites"])


@pytest.mark.slow
def test_training_step_syncs_one_process_within_budget():
    with tempfile.TemporaryDirectory() as tmp:
        reports = _step_syncs(tmp, 1, "train.ep_size=1")
    _assert_budget(reports)


@pytest.mark.slow
def test_training_step_syncs_expert_parallel_dynamic_k_within_budget():
    with tempfile.TemporaryDirectory() as tmp:
        reports = _step_syncs(tmp, 2, "train.ep_size=2", "model.patch_moe.router.dynamic_top_p=0.6",
                              "model.patch_moe.router.k_min=1")
    assert len(reports) == 2
    _assert_budget(reports)


@pytest.mark.slow
def test_training_step_syncs_node_local_transport_two_per_layer(tmp_path):
    """train.transport=node_local: two dropless all-to-alls in a row, each with its split sizes read
    once (stage 1 to the group's node, stage 2 inside it); one node of 2 ranks here (EP=2)."""
    out = str(tmp_path / "out")
    reports, _ = run_torchrun("sync_count_check.py", 2, [
        "--config", "configs/hierarchical.yaml", f"data.path={tmp_path}/data", f"out_dir={tmp_path}/runs",
        f"data.synth={TINY_DATA}", "model.dim=32", "model.stem_stride=4", "model.depth=2", "model.moe_blocks=[1]",
        "train.p=8", "train.k=2", "train.ep_size=2", "train.transport=node_local"], out)
    for r in reports:
        assert r["moe_layers"] == 1 and max(r["per_step"]) == 2 * r["moe_layers"] + 1, (r["per_step"], r["sites"])
        stage1 = sum(n for site, n in r["sites"].items() if site.startswith("parallel/node_transport.py:"))
        assert stage1 == len(r["per_step"]), r["sites"]  # once per step


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["model.patch_moe.router.choice=expert"], ["model.patch_moe.capacity_factor=1.0"]],
                         ids=["expert-choice", "capacity"])
def test_training_step_static_plans_sync_once_per_step(mode):
    """Expert choice and capacity mode under EP=2: the dispatching layers make no host read at all
    (static [E, C] plans, split sizes known on the host), so a step makes only its own one."""
    with tempfile.TemporaryDirectory() as tmp:
        reports = _step_syncs(tmp, 2, "train.ep_size=2", *mode)
    for r in reports:
        assert r["moe_layers"] >= 1 and max(r["per_step"]) == 1, (r["per_step"], r["sites"])

"""Host syncs per training step, counted under torchrun on CPU (tests/dist/sync_count_check.py with
gpucheck/host_syncs.py): within the budget of one per dispatching MoE layer and one per step
(the counter and single layers: tests/unit/gpucheck/test_host_syncs.py)."""

import os
import tempfile

import pytest

from tests.helpers import run_torchrun


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

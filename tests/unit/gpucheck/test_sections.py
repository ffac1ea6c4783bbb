"""The gpu-check sections' logic at tiny sizes on CPU, in this process (the check as a command, its
refusals and its dry run: tests/integration/test_gpu_check.py)."""

import os

import pytest
import torch

from gpucheck import section
from gpucheck.sections import benchmark as check_bench, dispatch as check_dispatch, layers as check_layers
from tests.helpers import ROOT


def test_layer_case_against_float64_reference():
    """One case of the layers section, end to end: margins, float64 reference, device run, errors."""
    case = next(c for c in check_layers.cases() if c.name == "PatchMoE ffn bmm")
    sizes = check_layers.Sizes.of(quick=True)
    layer, data, _ = check_layers.prepare(case, sizes, seed=0)
    assert check_layers.routing_margin(case, layer, data["x"], sizes.patch) >= check_layers.MARGIN
    ref = check_layers.reference_grads(case, layer, data)
    for dname, dtype in check_layers.DTYPES.items():
        mine = check_layers.device_grads(case, layer, data, torch.device("cpu"), dtype)
        assert set(mine) == set(ref)
        worst = max(section.relative_error(mine[n], ref[n]) for n in ref)
        assert worst <= check_layers.BOUND[dname], (dname, worst)


def test_relative_error_treats_a_missing_gradient_as_zero():
    assert section.relative_error(None, torch.zeros(3)) == 0.0
    assert section.relative_error(torch.ones(3), None) == float("inf")
    assert section.relative_error(torch.ones(2, 2), torch.ones(4)) == float("inf")
    assert section.relative_error(torch.tensor([1.0, 1.01]), torch.tensor([1.0, 1.0])) == pytest.approx(0.01 / 2 ** 0.5)


def test_dispatch_one_rank_group_on_gloo():
    if torch.distributed.is_initialized():
        pytest.skip("a process group already exists in this process")
    res = check_dispatch.one_rank(torch.device("cpu"))
    assert res["backend"] == "gloo"
    for name, r in res["rounds"].items():
        assert r["max_error"] <= check_dispatch.BOUND, (name, r)
    assert res["rounds"]["empty"]["load"][2:] == [0.0, 0.0]  # nothing routed to the pushed-down experts


def test_bench_goals_from_rows():
    rows = [{"name": "dense FFN (hidden K*F)", "fraction_of_gemm_peak": 0.8, "ratio_to_deepspeed": 0.3},
            {"name": "PatchMoE P=8", "fraction_of_gemm_peak": 0.55, "ratio_to_deepspeed": 0.5},
            {"name": "DeepSpeed MoE (top-2)", "fraction_of_gemm_peak": 0.2, "ratio_to_deepspeed": 1.0}]
    g = check_bench.goals(rows)
    assert g["PatchMoE share of dense GEMM rate"]["met"] is True
    assert g["PatchMoE throughput / DeepSpeed's"]["value"] == pytest.approx(2.0)
    cpu = check_bench.goals([{**r, "fraction_of_gemm_peak": None, "ratio_to_deepspeed": None} for r in rows[:2]])
    assert cpu["PatchMoE share of dense GEMM rate"]["met"] is None
    assert cpu["PatchMoE throughput / DeepSpeed's"]["met"] is None


def test_sync_budget_follows_the_config():
    from gpucheck.sections.syncs import sync_budget
    from training.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "h100.yaml"))
    assert sync_budget(cfg) == 1 + len(cfg.model.moe_blocks)  # one per dispatching MoE layer + one per step
    assert len(cfg.model.moe_blocks) == 4


def test_router_gradient_errors_are_over_the_whole_router():
    """A gate bias whose gradient cancels to ~1e-3 of its weights' is judged against the router's
    whole gradient (its rounding is as small as elsewhere); a wrong gradient still fails."""
    from gpucheck.sections.layers import router_errors

    ref = {"fine.0.gate.weights.0": torch.full((4, 4), 1.0), "fine.0.gate.biases.0": torch.full((4,), 1e-3),
           "coarse.gate.biases.0": torch.ones(3), "experts.w1": torch.ones(2), "out": torch.ones(1)}
    close = {**ref, "fine.0.gate.biases.0": ref["fine.0.gate.biases.0"] + 1e-6}
    errs = router_errors(close, ref)
    assert set(errs) == {"fine.0.gate.weights.0", "fine.0.gate.biases.0", "coarse.gate.biases.0"}
    assert errs["fine.0.gate.biases.0"] < 1e-6  # over its own norm it would read 1e-3
    wrong = {**ref, "coarse.gate.biases.0": -ref["coarse.gate.biases.0"]}
    assert router_errors(wrong, ref)["coarse.gate.biases.0"] == pytest.approx(2.0)

"""Clipping and BatchNorm syncing under expert parallelism (parallel/engine.py) among simulated ranks
in one process (tests/fake_dist.py): the EP gradient norm counts every dense parameter once and every
expert once, as the norm of the whole unsharded model does; running statistics end up averaged.

Legend: P ranks (one EP group, no expert replicas), E experts, El = E / P on each rank.
"""

import pytest
import torch
import torch.nn as nn

from parallel.engine import bf16_reduction, clip_grad_norm_ep, grad_norm_ep, is_expert_param, sync_batchnorm_stats
from parallel.groups import ParallelGroups
from tests.fake_dist import expert_group, run_ranks

P, E = 2, 4


def _groups(group, rank: int) -> ParallelGroups:
    return ParallelGroups(world_size=P, rank=rank, ep=expert_group(group, rank, E), edp_size=1, edp_group=None,
                          dp_group=group, name=f"ep_size_{P}")


def _grads(scale: float = 1.0):
    """The whole model's gradients: one dense parameter (reduced: identical everywhere), E experts."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, generator=g) * scale, torch.randn(E, 3, generator=g) * scale


def _rank_params(rank: int, scale: float = 1.0) -> list[torch.Tensor]:
    dense_g, experts_g = _grads(scale)
    dense, experts = torch.zeros(5, requires_grad=True), torch.zeros(E // P, 3, requires_grad=True)
    experts.allreduce = False  # what DeepSpeed's MoE registration marks (parallel/ds_moe.py)
    dense.grad, experts.grad = dense_g.clone(), experts_g[rank * E // P:(rank + 1) * E // P].clone()
    return [dense, experts]


def test_expert_params_are_the_ones_marked_for_no_allreduce():
    dense, experts = _rank_params(0)
    assert not is_expert_param(dense) and is_expert_param(experts)


def test_the_ep_norm_is_the_whole_models_norm_on_every_rank():
    full = torch.cat([g.flatten() for g in _grads()]).double().norm()
    norms = run_ranks(P, lambda rank, group: grad_norm_ep(_rank_params(rank), _groups(group, rank)))
    for n in norms:
        assert n.dtype == torch.float64 and n.dim() == 0
        torch.testing.assert_close(n, full)


@pytest.mark.parametrize("scale,max_norm", [(10.0, 1.0), (0.01, 1.0)])
def test_clipping_scales_to_the_global_norm_or_leaves_small_gradients(scale, max_norm):
    full = float(torch.cat([g.flatten() for g in _grads(scale)]).double().norm())

    def body(rank, group):
        params = _rank_params(rank, scale)
        before = clip_grad_norm_ep(params, max_norm, _groups(group, rank))
        return float(before), [p.grad.clone() for p in params]

    coef = min(1.0, max_norm / (full + 1e-6))
    for rank, (before, grads) in enumerate(run_ranks(P, body)):
        assert before == pytest.approx(full)
        for got, want in zip(grads, _rank_params(rank, scale)):
            torch.testing.assert_close(got, want.grad * coef)


def test_a_non_finite_norm_leaves_the_gradients_for_the_skip():
    def body(rank, group):
        params = _rank_params(rank)
        if rank == 1:  # one expert's gradient: the all-reduced norm is NaN on every rank
            params[1].grad[0, 0] = float("nan")
        clip_grad_norm_ep(params, 1e-3, _groups(group, rank))
        return params[1].grad.clone()

    for rank, g in enumerate(run_ranks(P, body)):
        want = _rank_params(rank)[1].grad
        if rank == 1:
            want[0, 0] = float("nan")
        torch.testing.assert_close(g, want, equal_nan=True)  # unscaled


def test_batchnorm_statistics_are_averaged_over_the_data_parallel_group():
    def body(rank, group):
        model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        model[1].running_mean.fill_(rank)
        model[1].running_var.fill_(2.0 * rank + 1)
        sync_batchnorm_stats(model, _groups(group, rank))
        return model[1].running_mean.tolist(), model[1].running_var.tolist()

    assert run_ranks(P, body) == [([0.5] * 3, [2.0] * 3)] * P


def test_bf16_reduces_in_fp32_and_accumulates_in_fp32_at_zero_1_only():
    assert bf16_reduction(0) == bf16_reduction(2) == {"communication_data_type": "fp32"}
    assert bf16_reduction(1) == {"communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}}

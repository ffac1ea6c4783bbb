"""Expert-choice routing (router.choice: expert) against a loop reference that takes, for each
expert, its top-C patches of the batch (tests/reference.py ``expert_choice_reference``): outputs
and the gradients of the input, the gate and the experts, fp32; with pruning, padding, both
untaken-patch outputs; the coverage statistic; the config's refusals."""

import math

import pytest
import torch

from common.config import ConfigError
from moe.config import ExpertConfig, PatchMoEConfig, RouterConfig
from moe.patch_moe import PatchMoE
from tests.reference import experts_to_modules, modules_grads
from tests.reference_choice import expert_choice_reference

TOL = dict(rtol=1e-5, atol=2e-5)


def _layer(e=4, k=2, cap=None, keep=1.0, out="identity", kind="ffn", **router):
    cfg = PatchMoEConfig(dim=8, patch_size=4, capacity_factor=cap, keep_fraction=keep, pruned_output=out,
                         router=RouterConfig(num_experts=e, top_k=k, choice="expert", **router),
                         expert=ExpertConfig(kind=kind, hidden_dim=16, dropout=0.0))
    return PatchMoE(cfg)


def _compare(layer, x):
    x1 = x.clone().requires_grad_()
    res = layer(x1)
    g = torch.randn_like(res.out)
    (res.out * g).sum().backward()
    gate_grads = [p.grad.clone() for p in layer.router.parameters()]
    scorer_grads = [p.grad.clone() for p in layer.scorer.parameters()] if layer.scorer is not None else []
    expert_grads = {n: q.grad.clone() for n, q in layer.experts.named_parameters()}
    layer.zero_grad()
    mods = experts_to_modules(layer.cfg.expert.kind, layer.experts)
    x2 = x.clone().requires_grad_()
    ref, taken = expert_choice_reference(layer, x2, mods)
    (ref * g).sum().backward()
    torch.testing.assert_close(res.out, ref, **TOL)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    for name, ref_grad in modules_grads(layer.cfg.expert.kind, mods).items():
        torch.testing.assert_close(expert_grads[name], ref_grad, **TOL, msg=name)
    for mine, theirs in zip(gate_grads, layer.router.parameters()):
        torch.testing.assert_close(mine, theirs.grad, **TOL)
    for mine, theirs in zip(scorer_grads, layer.scorer.parameters() if layer.scorer is not None else []):
        torch.testing.assert_close(mine, theirs.grad, **TOL)
    return res, taken


@pytest.mark.parametrize("e,k,cap", [(4, 2, None), (4, 1, 0.5), (8, 2, 1.5), (3, 2, 4.0)])
def test_expert_choice_equals_the_loop_reference(e, k, cap):
    torch.manual_seed(0)
    layer = _layer(e, k, cap)
    res, taken = _compare(layer, torch.randn(3, 16, 8, 8))  # 3 images x 4x2 patches: N = 24
    n = 24
    c = min(n, math.ceil((cap or 1.0) * n * k / e))
    assert all(len(units) == c for _, units in taken)
    torch.testing.assert_close(res.stats.load, torch.full((e,), float(c)))  # every expert exactly C
    assert float(res.stats.dropped_fraction) == 0.0
    hits = torch.zeros(n, dtype=torch.long)
    for _, units in taken:
        hits[units] += 1
    want = torch.stack([(hits.clamp(max=4) == b).float().mean() for b in range(5)])
    torch.testing.assert_close(res.stats.coverage, want)
    assert res.stats.active_experts == pytest.approx(e * c / n)


@pytest.mark.parametrize("out", ["identity", "zero"])
def test_expert_choice_with_pruning_and_untaken_patches(out):
    torch.manual_seed(1)
    layer = _layer(4, 1, 0.5, keep=0.5, out=out)  # 12 of 24 patches routed, each expert takes 2: many untaken
    res, taken = _compare(layer, torch.randn(3, 16, 8, 8))
    assert res.stats.num_units == 12 and res.stats.pruned_units == 12
    assert float(res.stats.coverage[0]) > 0  # some routed patches no expert took


def test_expert_choice_on_a_padded_map_with_seed_experts():
    torch.manual_seed(2)
    _compare(_layer(4, 2, None, kind="seed"), torch.randn(2, 10, 6, 8))  # 10x6: padded to 12x8


def test_expert_choice_ties_go_to_the_lower_patch():
    torch.manual_seed(3)
    layer = _layer(2, 1, None)
    x = torch.zeros(1, 8, 8, 8)  # every patch the same: all probs tie
    res = layer(x)
    assert res.stats.num_units == 4
    units = layer.route(x).decision.unit_ids
    assert units.tolist() == [[0, 1], [0, 1]]


def test_expert_choice_refuses_what_it_cannot_mean():
    with pytest.raises(ConfigError, match="dynamic_top_p"):
        RouterConfig(num_experts=4, choice="expert", dynamic_top_p=0.5)
    with pytest.raises(ConfigError, match="bias_update_rate"):
        RouterConfig(num_experts=4, choice="expert", bias_update_rate=0.01)
    with pytest.raises(ConfigError, match="choice"):
        RouterConfig(num_experts=4, choice="experts")

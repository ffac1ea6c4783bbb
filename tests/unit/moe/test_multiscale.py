"""MultiScaleMoE against the thesis code's own multi-scale fusion modules (GatingNetwork,
ExpertNetwork, MultiScaleMoE)."""

import pytest
import torch
import torch.nn as nn

from moe.config import BalanceConfig, MultiScaleMoEConfig
from moe.multiscale import MultiScaleMoE, window_features
from tests.reference import expert_balance_loss, multiscale_to_seed, seed_experts_to_modules, seed_modules_grads

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_fusion_matches_seed_code(heads, temperature):
    cfg = MultiScaleMoEConfig(dim=16, temperature=temperature, num_heads=heads, dropout=0.0,
                              balance=BalanceConfig(0.0, 0.0, 1.0))
    ours = MultiScaleMoE(cfg)
    seed, experts = multiscale_to_seed(ours)
    feats = [torch.randn(5, 16) for _ in range(3)]
    f1 = [f.clone().requires_grad_() for f in feats]
    f2 = [f.clone().requires_grad_() for f in feats]

    res = ours.fuse(f1)
    fused, weights = seed(f2)
    torch.testing.assert_close(res.out, fused, **TOL)
    torch.testing.assert_close(res.weights, weights, **TOL)
    torch.testing.assert_close(res.stats.aux_loss, expert_balance_loss(weights), **TOL)

    g = torch.randn_like(fused)
    ((res.out * g).sum() + res.stats.aux_loss).backward()
    ((fused * g).sum() + expert_balance_loss(weights)).backward()
    for a, b in zip(f1, f2):
        torch.testing.assert_close(a.grad, b.grad, **TOL)
    for name, ref in seed_modules_grads(experts).items():
        torch.testing.assert_close(getattr(ours.experts, name).grad, ref, **TOL, msg=name)
    seed_gate = seed.gating_network if heads == 1 else seed.gating_network.heads[0]
    lin0 = [m for m in seed_gate.gate if isinstance(m, nn.Linear)][0]
    torch.testing.assert_close(ours.gate.weights[0].grad[0], lin0.weight.grad.T, **TOL)


@pytest.mark.parametrize("depth", [1, 3])
def test_gate_depths(depth):
    cfg = MultiScaleMoEConfig(dim=8, gate_depth=depth, dropout=0.0)
    ours = MultiScaleMoE(cfg)
    assert len(ours.gate.weights) == depth
    feats = [torch.randn(4, 8) for _ in range(3)]
    x = torch.cat(feats, 1)
    h = x
    for i in range(depth):  # hand-written gate
        h = h @ ours.gate.weights[i][0] + ours.gate.biases[i][0, 0]
        if i < depth - 1:
            h = nn.functional.gelu(nn.functional.layer_norm(h, h.shape[-1:]))
    experts = seed_experts_to_modules(ours.experts, 0.0)
    w = torch.softmax(h, -1)
    expected = sum(w[:, s:s + 1] * experts[s](feats[s]) for s in range(3))
    torch.testing.assert_close(ours.fuse(feats).out, expected, **TOL)


@pytest.mark.parametrize("scales", [(4, 16), (4, 8, 16, 32), (4, 8, 16, 32, 64)])
def test_number_of_scale_experts(scales):
    ours = MultiScaleMoE(MultiScaleMoEConfig(dim=8, scales=scales))
    res = ours(torch.randn(2, 32, 16, 8))
    assert res.out.shape == (2, 8) and res.weights.shape == (2, len(scales))
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(2))


def test_window_features_by_loop():
    x = torch.randn(2, 12, 20, 3)
    f4, f8, f16 = window_features(x, (4, 8, 16))
    for b in range(2):
        for s, feat in ((4, f4), (8, f8), (16, f16)):
            kh, kw = min(s, 12), min(s, 20)
            means = [x[b, i:i + kh, j:j + kw].reshape(-1, 3).mean(0)
                     for i in range(0, 12 - kh + 1, kh) for j in range(0, 20 - kw + 1, kw)]
            torch.testing.assert_close(feat[b], torch.stack(means).amax(0))


def test_wrong_number_of_features():
    ours = MultiScaleMoE(MultiScaleMoEConfig(dim=8))
    with pytest.raises(ValueError, match="3 scale experts but got 2"):
        ours.fuse([torch.randn(2, 8), torch.randn(2, 8)])

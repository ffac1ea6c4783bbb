"""Dual sparsity (the thesis's Patch-MoE): patch pruning on the PatchMoE grid, and top-p's active experts."""

import math

import pytest
import torch

from common.config import ConfigError
from moe import ExpertConfig, PatchMoE, PatchMoEConfig, RouterConfig
from moe.units import make_grid, patchify


def _cfg(keep=1.0, out="identity", **router):
    return PatchMoEConfig(dim=8, patch_size=4, keep_fraction=keep, pruned_output=out,
                          router=RouterConfig(num_experts=4, top_k=2, **router),
                          expert=ExpertConfig(kind="ffn", hidden_dim=16, dropout=0.0))


def _pair(keep, out="identity"):
    torch.manual_seed(0)
    pruned = PatchMoE(_cfg(keep, out))
    full = PatchMoE(_cfg(1.0))
    full.load_state_dict({k: v for k, v in pruned.state_dict().items() if not k.startswith("scorer.")})
    return pruned, full


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("out", ["identity", "zero"])
def test_kept_patches_equal_the_unpruned_layer_and_pruned_pass_through(keep, out):
    pruned, full = _pair(keep, out)
    x = torch.randn(3, 16, 20, 8)  # 4 x 5 = 20 patches per image
    res, ref = pruned(x), full(x)
    grid = make_grid(x, 4)
    per_image = 20
    n_keep = math.ceil(keep * per_image)
    assert res.stats.num_units == 3 * n_keep and res.stats.pruned_units == 3 * (per_image - n_keep)
    y, y_ref, u = (patchify(t, grid) for t in (res.out, ref.out, x))
    # which patches were kept: those whose output differs from the pass-through value
    passthrough = u if out == "identity" else torch.zeros_like(u)
    kept = ~(y == passthrough).all(dim=(1, 2))
    assert int(kept.sum()) == 3 * n_keep
    assert kept.view(3, per_image).sum(1).tolist() == [n_keep] * 3  # per image
    torch.testing.assert_close(y[kept], y_ref[kept], rtol=1e-6, atol=1e-6)
    assert torch.equal(y[~kept], passthrough[~kept])
    # the kept ones are the scorer's top patches of each image
    scores = pruned.scorer(u.mean(1)).view(3, per_image)
    top = scores.topk(n_keep, dim=1).indices
    expect = torch.zeros(3, per_image, dtype=torch.bool).scatter_(1, top, True).flatten()
    assert torch.equal(kept, expect)


def test_scorer_learns_but_does_not_change_the_forward():
    pruned, _ = _pair(0.5)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    res = pruned(x)
    (res.out * torch.randn_like(res.out)).sum().backward()
    assert pruned.scorer.weight.grad is not None and pruned.scorer.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_routing_work_falls_with_the_kept_fraction():
    for keep in (1.0, 0.5, 0.25):
        torch.manual_seed(0)
        layer = PatchMoE(_cfg(keep))
        res = layer(torch.randn(2, 16, 16, 8))  # 16 patches per image
        assert res.stats.num_units == int(32 * keep)
        assert int(res.stats.load.sum()) == 2 * int(32 * keep)  # K slots per routed patch


def test_keep_fraction_validated():
    with pytest.raises(ConfigError, match="keep_fraction=0 must be in"):
        _cfg(0)
    with pytest.raises(ConfigError, match="pruned_output='drop'"):
        _cfg(0.5, "drop")


def test_top_p_active_experts_move_with_p():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 16, 8)
    pooled_NC = x.view(4, 4, 4, 4, 4, 8).mean((2, 4)).reshape(-1, 8)  # one row per 4x4 patch
    active = []
    for p in (0.2, 0.5, 0.8, 0.99):
        torch.manual_seed(1)
        layer = PatchMoE(PatchMoEConfig(dim=8, patch_size=4, router=RouterConfig(
            num_experts=8, dynamic_top_p=p, k_min=1, k_max=8, temperature=0.3),
            expert=ExpertConfig(kind="ffn", hidden_dim=16, dropout=0.0)))
        active.append(layer(x).stats.active_experts)
        # by hand: per patch, take experts by falling probability while the mass before them is < p
        ks = []
        for row in layer.router(pooled_NC).probs.detach().tolist():
            mass, k = 0.0, 0
            for q in sorted(row, reverse=True):
                if mass >= p:
                    break
                mass, k = mass + q, k + 1
            ks.append(min(max(k, 1), 8))
        assert float(active[-1]) == pytest.approx(sum(ks) / len(ks), rel=1e-6), (p, active[-1])
    assert active == sorted(active) and active[0] < active[-1], active

"""PatchMoE against a loop reference written from the thesis's Patch-MoE (outputs and every gradient, fp32)."""

import pytest
import torch

from moe.config import ExpertConfig, PatchMoEConfig, RouterConfig
from moe.patch_moe import PatchMoE
from tests.helpers import needs_cpu_grouped_mm
from tests.reference import experts_to_modules, modules_grads, patch_moe_reference

TOL = dict(rtol=1e-5, atol=2e-5)


def _layer(kind="seed", impl="auto", patch=4, cap=None, priority="order", dim=8, hidden=16, **router):
    router.setdefault("num_experts", 4)
    router.setdefault("top_k", 2)
    cfg = PatchMoEConfig(
        dim=dim, router=RouterConfig(**router),
        expert=ExpertConfig(kind=kind, hidden_dim=hidden, dropout=0.0, impl=impl),
        patch_size=patch, capacity_factor=cap, capacity_priority=priority,
    )
    return PatchMoE(cfg)


def _compare(layer, x, expect_drop=None):
    """Run layer and reference on x; compare outputs, input/expert/gate gradients and stats."""
    x1 = x.clone().requires_grad_()
    res = layer(x1)
    g = torch.randn_like(res.out)
    (res.out * g).sum().backward()
    gate_grads = [p.grad.clone() for p in layer.router.parameters()]
    layer.router.zero_grad()

    mods = experts_to_modules(layer.cfg.expert.kind, layer.experts)
    x2 = x.clone().requires_grad_()
    ref_out, routes, keep, probs = patch_moe_reference(layer, x2, mods)
    (ref_out * g).sum().backward()

    torch.testing.assert_close(res.out, ref_out, **TOL)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    for name, ref_grad in modules_grads(layer.cfg.expert.kind, mods).items():
        torch.testing.assert_close(getattr(layer.experts, name).grad, ref_grad, **TOL, msg=name)
    for mine, ref in zip(gate_grads, layer.router.parameters()):
        torch.testing.assert_close(mine, ref.grad, **TOL)

    e = layer.cfg.router.num_experts
    load = torch.zeros(e)
    kept = torch.zeros(e)
    for n, r in enumerate(routes):
        for k, (ex, _) in enumerate(r):
            load[ex] += 1
            kept[ex] += (n, k) in keep
    torch.testing.assert_close(res.stats.load, load)
    torch.testing.assert_close(res.stats.kept, kept)
    live = float(load.sum())
    assert res.stats.dropped_fraction == pytest.approx((live - kept.sum().item()) / live)
    if expect_drop is not None:
        assert (res.stats.dropped_fraction > 0) == expect_drop
    return res, routes


@pytest.mark.parametrize("kind", ["seed", "ffn", "conv"])
@pytest.mark.parametrize("impl", ["bmm", pytest.param("grouped_mm", marks=needs_cpu_grouped_mm), "fused"])
def test_matches_reference_per_expert_kind(kind, impl):
    layer = _layer(kind, impl)
    _compare(layer, torch.randn(2, 8, 12, 8), expect_drop=False)


@pytest.mark.parametrize(
    "router",
    [
        dict(top_k=1, normalize_topk=False),
        dict(top_k=4),  # k = num_experts
        dict(top_k=3, score_fn="sigmoid", temperature=2.0),
        dict(num_experts=8, dynamic_top_p=0.5, k_min=1, k_max=4),
        dict(top_k=2, num_heads=2, gate_depth=2),
    ],
)
def test_matches_reference_per_router(router):
    _compare(_layer("ffn", **router), torch.randn(2, 8, 8, 8))


@pytest.mark.parametrize("priority", ["order", "score"])
def test_capacity_overflow_drops_like_reference(priority):
    layer = _layer("seed", cap=0.5, priority=priority, num_experts=4, top_k=2)
    res, _ = _compare(layer, torch.randn(3, 8, 8, 8), expect_drop=True)
    cap = layer.dispatcher.capacity(res.stats.num_units, 2, 4, 0.5)
    assert res.stats.kept.max() <= cap


def test_capacity_is_enough_for_balanced_load():
    layer = _layer("ffn", cap=8.0)
    res, _ = _compare(layer, torch.randn(2, 8, 8, 8), expect_drop=False)
    assert res.stats.dropped_fraction == 0.0


def test_expert_that_receives_nothing():
    layer = _layer("seed", num_experts=4, top_k=2)
    with torch.no_grad():
        layer.router.gate.biases[0][0, 0, 3] = -1e4  # expert 3 can never make the top 2
    res, _ = _compare(layer, torch.randn(2, 8, 8, 8))
    assert res.stats.load[3] == 0
    assert layer.experts.w_in.grad[3].abs().sum() == 0


def test_ties_in_routing():
    layer = _layer("ffn", num_experts=4, top_k=2)
    with torch.no_grad():  # a zero gate: all scores tie, the two lowest ids win everywhere
        for p in layer.router.gate.parameters():
            p.zero_()
    res, routes = _compare(layer, torch.randn(1, 8, 8, 8))
    assert all([e for e, _ in r] == [0, 1] for r in routes)


@pytest.mark.parametrize("hw", [(10, 13), (5, 3)])
def test_maps_not_divisible_by_patch_are_padded_and_cropped(hw):
    layer = _layer("conv", patch=4)
    res, _ = _compare(layer, torch.randn(2, *hw, 8))
    assert res.out.shape == (2, *hw, 8)


def test_token_routing_is_patch_size_one():
    layer = _layer("seed", patch=1)
    res, routes = _compare(layer, torch.randn(2, 3, 5, 8))
    assert res.stats.num_units == 2 * 3 * 5 == len(routes)


def test_pad_mode_error():
    cfg = PatchMoEConfig(dim=8, router=RouterConfig(num_experts=4), patch_size=4, pad_mode="error")
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        PatchMoE(cfg)(torch.randn(1, 6, 8, 8))


def test_every_point_of_a_patch_gets_the_same_experts_and_weights():
    """Solve, per point, for the mixing weights over all experts that explain its output.

    y(point) = sum_e a_e * expert_e(point). With C > E and generic experts the a_e are unique,
    so least squares recovers which experts were used at that point and with what weight.
    """
    torch.manual_seed(3)
    p, c, e = 4, 16, 4
    layer = _layer("ffn", patch=p, dim=c, hidden=24, num_experts=e, top_k=2).eval()
    x = torch.randn(2, 8, 8, c)
    with torch.no_grad():
        res = layer(x)
        mods = experts_to_modules("ffn", layer.experts)
        per_expert = torch.stack([m(x) for m in mods], dim=-1)  # [B, H, W, C, E]
        a = torch.linalg.lstsq(per_expert, res.out.unsqueeze(-1)).solution.squeeze(-1)  # [B, H, W, E]
    assert torch.allclose(torch.einsum("bhwce,bhwe->bhwc", per_expert, a), res.out, atol=1e-4)
    dense = torch.zeros(res.weights.shape[0], e).scatter_add(1, _ids(layer, x), res.weights)
    n = 0
    for b in range(2):
        for i in range(0, 8, p):
            for j in range(0, 8, p):
                block = a[b, i:i + p, j:j + p].reshape(p * p, e)
                assert torch.allclose(block, block[0].expand_as(block), atol=1e-4)
                assert torch.allclose(block[0], dense[n], atol=1e-4)
                assert int((block[0].abs() > 1e-3).sum()) == 2
                n += 1


def _ids(layer, x):
    from moe.units import make_grid, patchify, pool_units

    grid = make_grid(x, layer.cfg.patch_size)
    return layer.router(pool_units(patchify(x, grid), grid)).expert_ids


def test_aux_loss_gradient_reaches_gate_and_bias_update_balances():
    layer = _layer("ffn", num_experts=4, top_k=1, normalize_topk=False, bias_update_rate=0.05)
    layer.train()
    x = torch.randn(4, 8, 8, 8) + 1.0
    res = layer(x)
    res.stats.aux_loss.backward()
    assert all(p.grad is not None for p in layer.router.gate.weights)
    spread_before = res.stats.load.max() - res.stats.load.min()
    for _ in range(60):
        layer(x)
        layer.apply_bias_update()
    with torch.no_grad():
        after = layer(x).stats.load
    assert after.max() - after.min() < spread_before
    assert layer.pending_load.sum() == layer(x).stats.load.sum()  # accumulates until applied


def test_bf16_forward_backward_runs_with_fp32_routing():
    layer = _layer("seed", dim=16, hidden=32).to(torch.bfloat16)
    x = torch.randn(2, 8, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    res = layer(x)
    assert res.out.dtype == torch.bfloat16 and res.weights.dtype == torch.float32
    res.out.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    ref = _layer("seed", dim=16, hidden=32)
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    torch.testing.assert_close(res.out.float(), ref(x.detach().float()).out, rtol=0.1, atol=0.15)


def test_no_images_at_all():
    """A rank with an empty shard: the in-place path (no padding) must run and backpropagate."""
    layer = _layer("seed", patch=4)
    x = torch.zeros(0, 8, 8, 8, requires_grad=True)
    res = layer(x)
    assert res.out.shape == (0, 8, 8, 8)
    res.out.sum().backward()
    assert x.grad.shape == x.shape

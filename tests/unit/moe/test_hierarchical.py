"""HierarchicalMoE against the loop reference (coarse group routing, then fine routing inside)."""

import pytest
import torch

from moe import ConfigError, ExpertConfig, HierarchicalMoE, HierarchicalMoEConfig, RouterConfig
from tests.reference import experts_to_modules, hierarchical_reference, modules_grads


def _cfg(mode="learned", placement="grouped", kc=1, kf=2, g=3, f=3, kind="ffn"):
    return HierarchicalMoEConfig(
        dim=8, patch_size=4, num_groups=g, experts_per_group=f, coarse_mode=mode, placement=placement,
        coarse=RouterConfig(num_experts=g, top_k=kc), fine=RouterConfig(num_experts=f, top_k=kf),
        expert=ExpertConfig(kind=kind, hidden_dim=16, dropout=0.0))


@pytest.mark.parametrize("mode,placement,kc,kf", [
    ("learned", "grouped", 1, 2), ("learned", "spread", 2, 1), ("learned", "grouped", 2, 2), ("given", "grouped", 1, 2),
    ("given", "spread", 1, 3),
])
@pytest.mark.parametrize("kind", ["ffn", "seed"])
def test_matches_reference(mode, placement, kc, kf, kind):
    torch.manual_seed(0)
    layer = HierarchicalMoE(_cfg(mode, placement, kc, kf, kind=kind))
    mods = experts_to_modules(kind, layer.experts)
    x = torch.randn(3, 8, 12, 8)
    modality = torch.tensor([0, 2, 1]) if mode == "given" else None
    xr = x.clone().requires_grad_()
    x = x.requires_grad_()
    res = layer(x, modality)
    g = torch.randn_like(res.out)
    (res.out * g).sum().backward()
    ref = hierarchical_reference(layer, xr, mods, modality)
    (ref * g).sum().backward()
    torch.testing.assert_close(res.out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for name, grad in modules_grads(kind, mods).items():
        torch.testing.assert_close(getattr(layer.experts, name).grad, grad, rtol=1e-4, atol=1e-5)
    assert res.stats.active_experts == kc * kf
    assert int(res.stats.load.sum()) == 3 * 2 * 3 * kc * kf


def test_given_modality_keeps_every_patch_in_its_group():
    torch.manual_seed(0)
    layer = HierarchicalMoE(_cfg("given", "grouped", 1, 2))
    res = layer(torch.randn(3, 8, 8, 8), torch.tensor([2, 2, 0]))
    load = res.stats.load.view(3, 3)  # grouped: row g = group g's experts
    assert load[1].sum() == 0 and load[2].sum() == 2 * 4 * 2 and load[0].sum() == 4 * 2


def test_placement_permutes_ids_not_the_function():
    torch.manual_seed(0)
    a = HierarchicalMoE(_cfg(placement="grouped"))
    b = HierarchicalMoE(_cfg(placement="spread"))
    b.load_state_dict(a.state_dict())
    perm = b.expert_id.flatten()  # spread id of (g, f) in grouped order
    with torch.no_grad():
        for name, p in b.experts.named_parameters():
            p[perm] = getattr(a.experts, name).clone()
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(a(x).out, b(x).out, rtol=1e-6, atol=1e-6)


def test_config_errors():
    with pytest.raises(ConfigError, match="coarse.num_experts=2 must equal num_groups=3"):
        HierarchicalMoEConfig(dim=8, coarse=RouterConfig(num_experts=2, top_k=1), fine=RouterConfig(num_experts=3))
    with pytest.raises(ValueError, match="needs the modality"):
        HierarchicalMoE(_cfg("given"))(torch.randn(1, 8, 8, 8))

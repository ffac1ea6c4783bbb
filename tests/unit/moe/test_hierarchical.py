"""HierarchicalMoE against the loop reference (coarse group routing, then fine routing inside)."""

import pytest
import torch

from common.config import ConfigError
from moe import ExpertConfig, HierarchicalMoE, HierarchicalMoEConfig, RouterConfig
from moe.hierarchical import expert_id_table
from tests.reference import experts_to_modules, hierarchical_reference, modules_grads, route_unit


def _cfg(mode="learned", placement="grouped", kc=1, kf=2, g=3, f=3, kind="ffn", **fine):
    fmax = f if isinstance(f, int) else max(f)
    return HierarchicalMoEConfig(
        dim=8, patch_size=4, num_groups=g, experts_per_group=f, coarse_mode=mode, placement=placement,
        coarse=RouterConfig(num_experts=g, top_k=kc), fine=RouterConfig(num_experts=fmax, top_k=kf, **fine),
        expert=ExpertConfig(kind=kind, hidden_dim=16, dropout=0.0))


def _against_reference(layer, kind, mode, x, modality):
    mods = experts_to_modules(kind, layer.experts)
    xr = x.clone().requires_grad_()
    x = x.clone().requires_grad_()
    res = layer(x, modality)
    g = torch.randn_like(res.out)
    (res.out * g).sum().backward()
    ref = hierarchical_reference(layer, xr, mods, modality)
    (ref * g).sum().backward()
    torch.testing.assert_close(res.out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for name, grad in modules_grads(kind, mods).items():
        torch.testing.assert_close(getattr(layer.experts, name).grad, grad, rtol=1e-4, atol=1e-5)
    return res


@pytest.mark.parametrize("mode,placement,kc,kf", [
    ("learned", "grouped", 1, 2), ("learned", "spread", 2, 1), ("learned", "grouped", 2, 2), ("given", "grouped", 1, 2),
    ("given", "spread", 1, 3),
])
@pytest.mark.parametrize("kind", ["ffn", "seed"])
def test_matches_reference(mode, placement, kc, kf, kind):
    torch.manual_seed(0)
    layer = HierarchicalMoE(_cfg(mode, placement, kc, kf, kind=kind))
    modality = torch.tensor([0, 2, 1]) if mode == "given" else None
    res = _against_reference(layer, kind, mode, torch.randn(3, 8, 12, 8), modality)
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


# ---- groups of different sizes ---------------------------------------------------------------


@pytest.mark.parametrize("mode,placement,kc,kf", [
    ("learned", "grouped", 1, 2), ("learned", "spread", 2, 2), ("learned", "grouped", 3, 1),
    ("given", "grouped", 1, 2), ("given", "spread", 1, 2),
])
@pytest.mark.parametrize("kind", ["ffn", "seed"])
def test_unequal_groups_match_reference(mode, placement, kc, kf, kind):
    torch.manual_seed(0)
    layer = HierarchicalMoE(_cfg(mode, placement, kc, kf, f=(4, 2, 3), kind=kind))
    assert layer.cfg.num_experts == 9 and [r.cfg.num_experts for r in layer.fine] == [4, 2, 3]
    assert tuple(layer.experts.parameters())[0].shape[0] == 9
    modality = torch.tensor([0, 2, 1]) if mode == "given" else None
    res = _against_reference(layer, kind, mode, torch.randn(3, 8, 12, 8), modality)
    # router gradients too (the fine routers of different widths)
    for r in layer.fine:
        assert r.gate.weights[0].grad is not None
    assert int(res.stats.load.sum()) == 3 * 2 * 3 * kc * kf


def test_unequal_groups_dynamic_k():
    torch.manual_seed(0)
    layer = HierarchicalMoE(_cfg("learned", "spread", 2, 2, f=(2, 4, 3), dynamic_top_p=0.5, k_max=2))
    _against_reference(layer, "ffn", "learned", torch.randn(2, 8, 8, 8), None)


@pytest.mark.parametrize("placement", ["grouped", "spread"])
def test_unequal_groups_probs_at_their_ids(placement):
    """probs over E = p(g) * p(f | g), each group's at its experts' global ids, by loops."""
    torch.manual_seed(0)
    sizes = (4, 1, 2)
    layer = HierarchicalMoE(_cfg("learned", placement, 2, 1, f=sizes))
    pooled = torch.randn(5, 8)
    route = layer.route(pooled, None)
    table = expert_id_table(sizes, placement)
    assert sorted(i for row in table for i in row) == list(range(7))
    for n in range(5):
        _, pc = route_unit(layer.coarse, pooled[n])
        expect = torch.zeros(7)
        for g, row in enumerate(table):
            _, pf = route_unit(layer.fine[g], pooled[n])
            for f, e in enumerate(row):
                expect[e] = pc[g] * pf[f]
        torch.testing.assert_close(route.decision.probs[n].detach(), expect, rtol=1e-6, atol=1e-7)
    # a group's picks are its own experts only
    for n in range(5):
        for j in range(2):
            g = int(route.group_NKc[n, j])
            assert int(route.expert_NKcKf[n, j, 0]) in table[g]


def test_id_table():
    assert expert_id_table((8, 4, 4), "grouped")[1] == [8, 9, 10, 11]
    assert expert_id_table((3, 3), "spread") == [[0, 2, 4], [1, 3, 5]]  # f*G + g for equal groups
    assert expert_id_table((3, 1, 2), "spread") == [[0, 3, 5], [1], [2, 4]]


@pytest.mark.parametrize("placement", ["grouped", "spread"])
def test_equal_sizes_as_a_list_are_the_int_form_bit_for_bit(placement):
    torch.manual_seed(0)
    a = HierarchicalMoE(_cfg("learned", placement, 2, 2, f=3))
    torch.manual_seed(0)
    b = HierarchicalMoE(_cfg("learned", placement, 2, 2, f=(3, 3, 3)))
    assert torch.equal(a.expert_id, b.expert_id)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(2, 8, 8, 8)
    ra, rb = a(x), b(x)
    assert torch.equal(ra.out, rb.out) and torch.equal(ra.stats.aux_loss, rb.stats.aux_loss)
    assert torch.equal(ra.stats.load, rb.stats.load)


def test_unequal_config_errors():
    with pytest.raises(ConfigError, match=r"fine.top_k=3 is larger than the smallest group \(experts_per_group=\[4, 2, 3\]\)"):
        _cfg(kf=3, f=(4, 2, 3))
    with pytest.raises(ConfigError, match=r"fine.k_max=4 is larger than the smallest group.*choose fine.k_max <= 2"):
        _cfg(kf=1, f=(4, 2, 3), dynamic_top_p=0.5)  # k_max defaults to num_experts = 4
    with pytest.raises(ConfigError, match=r"lists 2 group sizes for num_groups=3"):
        _cfg(f=(4, 2))
    with pytest.raises(ConfigError, match=r"fine.num_experts=3 must equal the largest group size"):
        HierarchicalMoEConfig(dim=8, experts_per_group=(4, 2, 3), coarse=RouterConfig(num_experts=3, top_k=1),
                              fine=RouterConfig(num_experts=3))
    with pytest.raises(ConfigError, match=r"every group size must be an integer >= 1"):
        _cfg(f=(4, 0, 3))


def test_from_dict_reads_a_yaml_list():
    from common.config import from_dict
    cfg = from_dict(HierarchicalMoEConfig, {"dim": 8, "experts_per_group": [8, 4, 4], "coarse": {"num_experts": 3},
                                            "fine": {"num_experts": 8, "top_k": 2}})
    assert cfg.experts_per_group == (8, 4, 4) and cfg.group_sizes == (8, 4, 4) and cfg.num_experts == 16
    assert from_dict(HierarchicalMoEConfig, {"dim": 8, "experts_per_group": 2, "coarse": {"num_experts": 3},
                                             "fine": {"num_experts": 2}}).group_sizes == (2, 2, 2)


# ---- fine-level expert choice ----------------------------------------------------------------
@pytest.mark.parametrize("mode,placement,kc,kf,f,cap", [
    ("learned", "grouped", 1, 2, 3, None), ("learned", "spread", 2, 1, 3, 0.5), ("given", "grouped", 1, 2, 3, 1.5),
    ("learned", "grouped", 1, 1, [4, 2, 2], 2.0),
])
def test_fine_expert_choice_matches_reference(mode, placement, kc, kf, f, cap):
    from dataclasses import replace

    from tests.reference_choice import hierarchical_expert_choice_reference

    torch.manual_seed(4)
    base = _cfg(mode, placement, kc, kf, f=f, choice="expert")
    layer = HierarchicalMoE(replace(base, capacity_factor=cap))
    modality = torch.tensor([0, 2, 2]) if mode == "given" else None
    mods = experts_to_modules("ffn", layer.experts)
    x = torch.randn(3, 8, 12, 8)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    res = layer(x1, modality)
    g = torch.randn_like(res.out)
    (res.out * g).sum().backward()
    ref, taken = hierarchical_expert_choice_reference(layer, x2, mods, modality)
    (ref * g).sum().backward()
    torch.testing.assert_close(res.out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for name, grad in modules_grads("ffn", mods).items():
        torch.testing.assert_close(getattr(layer.experts, name).grad, grad, rtol=1e-4, atol=1e-5)
    load = res.stats.load.tolist()
    assert load == [float(len(taken[e])) for e in range(layer.cfg.num_experts)]
    if mode == "given":  # group 1 has no patch: its experts take nothing, their slots are padding
        ids = layer.expert_id[1, :3].tolist()
        assert all(load[e] == 0 for e in ids)
    n = 3 * 2 * 3
    hits = torch.zeros(n, dtype=torch.long)
    for units in taken.values():
        for u in units:
            hits[u] += 1
    want = torch.stack([(hits.clamp(max=4) == k).float().mean() for k in range(5)])
    torch.testing.assert_close(res.stats.coverage, want)


def test_fine_expert_choice_gate_gradients_match_reference():
    from tests.reference_choice import hierarchical_expert_choice_reference

    torch.manual_seed(5)
    layer = HierarchicalMoE(_cfg("learned", "grouped", 2, 1, choice="expert"))
    mods = experts_to_modules("ffn", layer.experts)
    x = torch.randn(2, 8, 8, 8)
    g = torch.randn_like(x)
    (layer(x).out * g).sum().backward()
    ours = {n: p.grad.clone() for n, p in layer.named_parameters() if not n.startswith("experts.")}
    layer.zero_grad()
    ref, _ = hierarchical_expert_choice_reference(layer, x, mods)
    (ref * g).sum().backward()
    for n, p in layer.named_parameters():
        if not n.startswith("experts."):
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_expert_choice_config_refusals():
    with pytest.raises(ConfigError, match="coarse.choice='expert' is not supported"):
        HierarchicalMoEConfig(dim=8, coarse=RouterConfig(num_experts=3, top_k=1, choice="expert"),
                              fine=RouterConfig(num_experts=3))
    with pytest.raises(ConfigError, match="capacity_factor=0.5 applies to fine.choice='expert' only"):
        HierarchicalMoEConfig(dim=8, coarse=RouterConfig(num_experts=3, top_k=1), fine=RouterConfig(num_experts=3),
                              capacity_factor=0.5)

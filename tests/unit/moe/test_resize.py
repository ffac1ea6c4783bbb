"""Changing the expert count: upcycling keeps the function, pruning/merging keep the chosen experts."""

import dataclasses

import pytest
import torch

from moe import ExpertConfig, PatchMoE, PatchMoEConfig, RouterConfig
from moe.resize import ResizeError, shrink_state, upcycle_state


def _layer(e, k=2, score_fn="softmax", heads=1, depth=1, rate=0.0, kind="ffn"):
    return PatchMoE(PatchMoEConfig(dim=8, patch_size=4, router=RouterConfig(
        num_experts=e, top_k=k, score_fn=score_fn, num_heads=heads, gate_depth=depth, bias_update_rate=rate),
        expert=ExpertConfig(kind=kind, hidden_dim=16, dropout=0.0)))


def _resized(layer, e_new):
    cfg = layer.cfg
    return PatchMoE(dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, num_experts=e_new)))


@pytest.mark.parametrize("score_fn,heads,depth,kind", [("softmax", 1, 1, "ffn"), ("softmax", 2, 2, "seed"),
                                                      ("sigmoid", 1, 1, "ffn"), ("softmax", 1, 3, "conv")])
@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_upcycle_3_to_24_keeps_the_function(score_fn, heads, depth, kind, noise):
    torch.manual_seed(0)
    small = _layer(3, score_fn=score_fn, heads=heads, depth=depth, kind=kind).eval()
    with torch.no_grad():
        small.router.selection_bias.copy_(torch.tensor([0.05, -0.02, 0.0]))  # a trained aux-free bias
    big = _resized(small, 24).eval()
    big.load_state_dict(upcycle_state(small.state_dict(), 3, 24, score_fn=score_fn, noise=noise,
                                      generator=torch.Generator().manual_seed(1)))
    x = torch.randn(4, 16, 16, 8)
    a, b = small(x), big(x)
    torch.testing.assert_close(b.out, a.out, rtol=1e-5, atol=1e-6)
    # only copy 0 of each expert (ids 0, 8, 16) is used at step 0
    used = torch.nonzero(b.stats.load).flatten().tolist()
    assert set(used) <= {0, 8, 16} and b.stats.load.sum() == a.stats.load.sum()
    if noise > 0:  # the other copies differ from their original
        w_small = next(small.experts.parameters())
        w_big = next(big.experts.parameters())
        assert torch.equal(w_big[8], w_small[1]) and not torch.equal(w_big[9], w_small[1])


def test_upcycled_layer_trains_and_brings_copies_in():
    torch.manual_seed(0)
    small = _layer(3)
    big = PatchMoE(dataclasses.replace(small.cfg, router=dataclasses.replace(
        small.cfg.router, num_experts=24, bias_update_rate=0.05)))
    big.load_state_dict(upcycle_state(small.state_dict(), 3, 24, noise=0.01))
    opt = torch.optim.Adam(big.parameters(), lr=1e-3)
    target = torch.randn(4, 16, 16, 8)
    losses = []
    for _ in range(60):
        x = torch.randn(4, 16, 16, 8)
        res = big(x)
        loss = (res.out - target).square().mean() + res.stats.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        big.apply_bias_update()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert int((res.stats.load > 0).sum()) > 3  # copies beyond copy 0 now receive patches


def test_upcycle_errors():
    with pytest.raises(ResizeError, match="whole multiple of 3"):
        upcycle_state(_layer(3).state_dict(), 3, 7)


@pytest.mark.parametrize("mode", ["prune", "merge"])
def test_shrink_keeps_the_most_used(mode):
    torch.manual_seed(0)
    big = _layer(6)
    usage = [10, 0, 50, 3, 40, 1]
    sd, kept = shrink_state(big.state_dict(), 6, 3, usage, mode=mode)
    assert kept == [0, 2, 4]
    small = _resized(big, 3)
    small.load_state_dict(sd)
    for name, p in small.experts.named_parameters():
        full = getattr(big.experts, name)
        if mode == "prune":
            assert torch.equal(p, full[[0, 2, 4]])
        else:  # dropped experts averaged in by usage: kept weights move, but stay mostly theirs
            assert not torch.equal(p, full[[0, 2, 4]])
    # a patch whose experts are all kept is routed the same among them
    wk = "router.gate.weights.0"
    assert torch.equal(sd[wk], big.state_dict()[wk][..., [0, 2, 4]])
    x = torch.randn(2, 8, 8, 8)
    assert small(x).out.shape == x.shape


def test_merge_total_usage_weighting():
    """One dropped expert merged into its nearest kept one: usage-weighted average, by hand."""
    torch.manual_seed(0)
    big = _layer(3, k=1)
    sd = big.state_dict()
    w = sd["router.gate.weights.0"].clone()
    w[..., 2] = w[..., 0] * 2  # expert 2's gate column points like expert 0's
    sd["router.gate.weights.0"] = w
    usage = [3, 5, 1]
    out, kept = shrink_state(sd, 3, 2, usage, mode="merge")
    assert kept == [0, 1]
    for k in (k for k in sd if k.startswith("experts.")):
        expect = (sd[k][0].double() * 3 + sd[k][2].double() * 1) / 4
        torch.testing.assert_close(out[k][0].double(), expect)
        assert torch.equal(out[k][1], sd[k][1])


# ---- one group of a HierarchicalMoE ------------------------------------------------------------
def _hier(sizes, placement="grouped", mode="learned", kf=2, rate=0.0):
    from moe import HierarchicalMoE, HierarchicalMoEConfig
    return HierarchicalMoE(HierarchicalMoEConfig(
        dim=8, patch_size=4, num_groups=len(sizes), experts_per_group=tuple(sizes), coarse_mode=mode,
        placement=placement, coarse=RouterConfig(num_experts=len(sizes), top_k=2),
        fine=RouterConfig(num_experts=max(sizes), top_k=kf, bias_update_rate=rate),
        expert=ExpertConfig(kind="ffn", hidden_dim=16, dropout=0.0)))


@pytest.mark.parametrize("placement", ["grouped", "spread"])
@pytest.mark.parametrize("mode", ["learned", "given"])
@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_upcycle_one_group_keeps_the_function(placement, mode, noise):
    from moe.hierarchical import expert_id_table
    from moe.resize import resize_group_state
    torch.manual_seed(0)
    small = _hier((4, 4, 4), placement, mode).eval()
    sd = small.state_dict()
    new_sd, sizes = resize_group_state(sd, (4, 4, 4), placement, 0, 8, mode="upcycle", noise=noise,
                                       generator=torch.Generator().manual_seed(1))
    assert sizes == (8, 4, 4)
    big = _hier(sizes, placement, mode).eval()
    big.load_state_dict(new_sd)
    x = torch.randn(3, 8, 12, 8)
    modality = torch.tensor([0, 1, 0]) if mode == "given" else None
    torch.testing.assert_close(big(x, modality).out, small(x, modality).out, rtol=1e-5, atol=1e-6)
    # the coarse router and the other groups' routers: unchanged; their experts moved to their new ids
    for k, v in sd.items():
        if not k.startswith(("fine.0.", "experts.")):
            assert torch.equal(new_sd[k], v), k
    old_ids, new_ids = expert_id_table((4, 4, 4), placement), expert_id_table(sizes, placement)
    for name, w in small.experts.named_parameters():
        w_new = getattr(big.experts, name)
        for g in (1, 2):
            for f in range(4):
                assert torch.equal(w_new[new_ids[g][f]], w[old_ids[g][f]])
        for f in range(4):  # copy 0 of each of group 0's experts is exact
            assert torch.equal(w_new[new_ids[0][2 * f]], w[old_ids[0][f]])


@pytest.mark.parametrize("placement", ["grouped", "spread"])
@pytest.mark.parametrize("how", ["prune", "merge"])
def test_shrink_one_group_keeps_its_most_used(placement, how):
    from moe.hierarchical import expert_id_table
    from moe.resize import resize_group_state
    torch.manual_seed(0)
    sizes = (3, 4, 2)
    layer = _hier(sizes, placement, kf=1)
    sd = layer.state_dict()
    old_ids = expert_id_table(sizes, placement)
    usage = torch.zeros(9)
    usage[old_ids[1]] = torch.tensor([5.0, 0.0, 9.0, 1.0])  # group 1 keeps f = 0 and 2
    usage[old_ids[0]] = 100.0  # other groups' usage must not matter
    new_sd, new_sizes = resize_group_state(sd, sizes, placement, 1, 2, mode=how, usage=usage)
    assert new_sizes == (3, 2, 2)
    new_ids = expert_id_table(new_sizes, placement)
    for name, w in layer.experts.named_parameters():
        w_new = new_sd[f"experts.{name}"]
        assert w_new.shape[0] == 7
        for g in (0, 2):
            for f in range(sizes[g]):
                assert torch.equal(w_new[new_ids[g][f]], w[old_ids[g][f]])
        if how == "prune":
            assert torch.equal(w_new[new_ids[1][0]], w[old_ids[1][0]])
            assert torch.equal(w_new[new_ids[1][1]], w[old_ids[1][2]])
    wk = "fine.1.gate.weights.0"
    assert torch.equal(new_sd[wk], sd[wk][..., [0, 2]])
    assert torch.equal(new_sd["fine.1.selection_bias"], sd["fine.1.selection_bias"][[0, 2]])
    for k, v in sd.items():
        if not k.startswith(("fine.1.", "experts.")):
            assert torch.equal(new_sd[k], v), k
    small = _hier(new_sizes, placement, kf=1)
    small.load_state_dict(new_sd)
    assert small(torch.randn(2, 8, 8, 8)).out.shape == (2, 8, 8, 8)


def test_resize_group_errors():
    from moe.resize import resize_group_state
    sd = _hier((2, 2)).state_dict()
    with pytest.raises(ResizeError, match="group=2 is not one of the layer's groups 0..1"):
        resize_group_state(sd, (2, 2), "grouped", 2, 4)
    with pytest.raises(ResizeError, match="experts_per_group=\\[2, 3\\] makes 5"):
        resize_group_state(sd, (2, 3), "grouped", 0, 4)
    with pytest.raises(ResizeError, match="whole multiple of 2"):
        resize_group_state(sd, (2, 2), "grouped", 0, 3)

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

"""Per-expert initialisation (moe/experts.py): expert e's weights depend only on (seed, e).

What sharded construction (issue 28) relies on: a rank that builds experts ``first ..`` of a
layer gets exactly the rows the full layer would hold there, whatever the slice; a meta build
holds shapes only.
"""

import pytest
import torch

from moe.config import ExpertConfig
from moe.experts import build_experts, experts_on_meta


@pytest.mark.parametrize("kind", ["seed", "ffn", "conv"])
@pytest.mark.parametrize("parts", [2, 4])
def test_slices_built_apart_concatenate_to_the_full_layer(kind, parts):
    cfg = ExpertConfig(kind=kind, hidden_dim=12)
    full = build_experts(cfg, 8, 6, seed=1234)
    per = 8 // parts
    slices = [build_experts(cfg, per, 6, first=p * per, seed=1234) for p in range(parts)]
    for name, p_full in full.named_parameters():
        joined = torch.cat([getattr(s, name) for s in slices])
        assert torch.equal(joined, p_full), name


def test_another_seed_gives_other_experts_and_a_drawn_seed_follows_manual_seed():
    cfg = ExpertConfig(kind="ffn", hidden_dim=12)
    a, b = build_experts(cfg, 2, 6, seed=1), build_experts(cfg, 2, 6, seed=2)
    assert not torch.equal(a.w1, b.w1)
    assert not torch.equal(a.w1[0], a.w1[1])  # experts of one layer differ from each other
    torch.manual_seed(7)
    c = build_experts(cfg, 2, 6)
    torch.manual_seed(7)
    d = build_experts(cfg, 2, 6)
    assert c.seed == d.seed and torch.equal(c.w1, d.w1)


def test_meta_build_holds_shapes_and_no_storage():
    cfg = ExpertConfig(kind="seed", hidden_dim=12)
    with experts_on_meta():
        m = build_experts(cfg, 4, 6, seed=3)
    real = build_experts(cfg, 4, 6, seed=3)
    for (name, p_meta), p_real in zip(m.named_parameters(), real.parameters()):
        assert p_meta.is_meta and p_meta.shape == p_real.shape, name
    assert not build_experts(cfg, 1, 6, seed=3).w_in.is_meta  # outside the context: real again


def test_initial_weights_keep_the_linear_bound():
    cfg = ExpertConfig(kind="ffn", hidden_dim=400)
    e = build_experts(cfg, 3, 100, seed=5)
    assert e.w1.abs().max() <= 1 / 100 ** 0.5 and e.w2.abs().max() <= 1 / 400 ** 0.5
    assert e.w1.std() > 0.5 / (3 * 100) ** 0.5  # uniform on the whole interval, not collapsed

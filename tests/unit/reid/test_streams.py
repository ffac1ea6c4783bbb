"""Modality streams (reid/model.py, model.streams=per_modality) and absent modalities.

The batched model (the three modalities' maps stacked, one backbone pass) must equal a loop
reference that runs each modality's map through the backbone alone and averages the features:
values and every gradient. With hierarchical blocks routing coarse by the given modality, a patch
of modality m only ever reaches group m's experts."""

import pytest
import torch

from common.config import ConfigError
from reid.data import MODALITIES, Batch
from reid.model import MODALITY_INDEX, ReIDModel
from training.config import load_config

HIER = ["model.streams=per_modality", "model.moe_kind=hierarchical",
        "model.hierarchical={num_groups: 3, experts_per_group: 2, coarse_mode: given, "
        "coarse: {num_experts: 3, top_k: 1}, fine: {num_experts: 2, top_k: 2}}"]


def _batch(b=3):
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(b, 3, 64, 32, generator=g), torch.randn(b, 1, 64, 32, generator=g),
                 torch.randn(b, 1, 64, 32, generator=g), torch.zeros(b, dtype=torch.long),
                 torch.zeros(b, dtype=torch.long))


GRAD_ATOL = 2e-5  # relative to the gradient tensor's largest entry (seen: <= 5e-6)
HIER_FUSION = HIER + ["model.fusion=hierarchical", "model.hierarchical_fusion={experts_per_cell: 2, top_k: 1}"]


def _reference_feat(model, batch, modalities):
    """One modality at a time through the shared backbone; then the flat head on each map and the
    mean, or the hierarchical head on the present modalities' maps."""
    maps = []
    for m in modalities:
        x = model.norm_in(model.stems[m](getattr(batch, m)).permute(0, 2, 3, 1))
        given = torch.full((x.shape[0],), MODALITY_INDEX[m])
        for block in model.blocks:
            x = block(x, given).x
        maps.append(model.norm_out(x))
    if model.cfg.fusion == "hierarchical":
        return model.fusion(torch.cat(maps), [MODALITY_INDEX[m] for m in modalities]).out
    return torch.stack([model.fusion(x).out for x in maps]).mean(0)


@pytest.mark.parametrize("extra", [HIER, ["model.streams=per_modality"], HIER_FUSION],
                         ids=["hierarchical-given", "patch", "hierarchical-fusion"])
@pytest.mark.parametrize("present", [tuple(MODALITIES), ("rgb", "tir")], ids=["all", "nir-absent"])
def test_batched_streams_equal_one_modality_at_a_time(extra, present):
    cfg = load_config("configs/tiny.yaml", extra)
    model = ReIDModel(cfg.model, num_classes=5).eval()  # eval: dropout off, BN by running stats
    batch = _batch()
    ours = model(batch, present).feat
    g = torch.randn_like(ours)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad((ours * g).sum(), [p for _, p in params], allow_unused=True)
    ref = _reference_feat(model, batch, present)
    ref_grads = torch.autograd.grad((ref * g).sum(), [p for _, p in params], allow_unused=True)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(params, grads, ref_grads):
        if a is None or b is None:
            assert a is None and b is None, name
        else:
            # fp32, another summation order: error on the scale of the gradient's largest entry
            # (a bias summed over every position carries a few ulps of its largest terms)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=GRAD_ATOL * float(b.abs().max()), msg=name)


def test_a_modality_reaches_only_its_own_group_of_experts():
    cfg = load_config("configs/tiny.yaml", HIER)
    model = ReIDModel(cfg.model, num_classes=5)
    for m in MODALITIES:
        out = model(_batch(), (m,))
        load = out.moe_stats[0].load  # [E] routed slots, grouped placement: group g = experts 2g, 2g+1
        g = MODALITY_INDEX[m]
        assert load[2 * g:2 * g + 2].sum() > 0 and load.sum() == load[2 * g:2 * g + 2].sum(), (m, load)
        out.feat.sum().backward()
        w = model.blocks[1].ffn.experts.w1.grad  # [E, C, F]
        others = [e for e in range(6) if e // 2 != g]
        assert w[others].abs().sum() == 0 and w[2 * g:2 * g + 2].abs().sum() > 0
        model.zero_grad()


def test_given_modality_routing_needs_modality_streams():
    with pytest.raises(ConfigError, match="coarse_mode='given' .* needs model.streams=per_modality"):
        load_config("configs/tiny.yaml", ["model.moe_kind=hierarchical", "model.hierarchical={coarse_mode: given}"])
    with pytest.raises(ConfigError, match=r"eval.modalities=\['rgb', 'x'\] must name one or more of"):
        load_config("configs/tiny.yaml", ["eval.modalities=rgb,x"])

"""The ReID model's shapes and wiring (reid/model.py)."""

import os

import torch

from moe import PatchMoE
from reid.data import Batch
from reid.model import ReIDModel
from tests.helpers import ROOT
from training.config import load_config


def _batch(b=6, h=64, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(b, 3, h, w, generator=g), torch.randn(b, 1, h, w, generator=g),
                 torch.randn(b, 1, h, w, generator=g), torch.arange(b) // 2, torch.arange(b) % 3)


def test_model_shapes_and_wiring():
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"))
    torch.manual_seed(0)
    model = ReIDModel(cfg.model, num_classes=11)
    moe_blocks = [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, PatchMoE)]
    assert moe_blocks == list(cfg.model.moe_blocks)
    out = model(_batch())
    d = cfg.model.dim
    assert out.feat.shape == (6, d) and out.feat_bn.shape == (6, d) and out.logits.shape == (6, 11)
    assert len(out.moe_stats) == len(moe_blocks)
    assert out.fusion_weights.shape == (6, len(cfg.model.multiscale_config().scales))
    torch.testing.assert_close(out.fusion_weights.sum(1), torch.ones(6))
    # every patch of the 16x8 grid (patch 4 -> 4x2 per image) got one decision
    assert out.moe_stats[0].num_units == 6 * 4 * 2
    out.logits.sum().backward()
    for m in ("rgb", "nir", "tir"):  # every modality's stem is trained
        assert model.stems[m].net[0].weight.grad.abs().sum() > 0
    assert model.bnneck.bias.grad is None  # BNNeck bias frozen


def test_aux_loss_is_the_sum_of_the_layers():
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"))
    model = ReIDModel(cfg.model, num_classes=3).eval()
    out = model(_batch())
    expect = out.fusion_stats.aux_loss + sum(s.aux_loss for s in out.moe_stats)
    torch.testing.assert_close(out.aux_loss, expect)
    assert float(out.aux_loss.detach()) > 0

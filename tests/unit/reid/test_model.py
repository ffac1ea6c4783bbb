"""The ReID model's shapes and wiring, the losses against brute-force loops, and the configs."""

import glob
import os

import numpy as np
import pytest
import torch

from moe import ConfigError, PatchMoE
from reid.config import RunConfig, load_config
from reid.data import Batch
from reid.losses import batch_hard_triplet, pairwise_distances
from reid.model import ReIDModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_triplet_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(8, 5, generator=g)
    pid = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])  # id 3 has no positive: left out
    d = torch.cdist(feat.double(), feat.double())
    losses = []
    for a in range(8):
        pos = [d[a, p] for p in range(8) if p != a and pid[p] == pid[a]]
        neg = [d[a, n] for n in range(8) if pid[n] != pid[a]]
        if pos and neg:
            losses.append(max(0.0, float(max(pos) - min(neg)) + 0.3))
    assert float(batch_hard_triplet(feat, pid, 0.3)) == pytest.approx(np.mean(losses), rel=1e-5)
    torch.testing.assert_close(pairwise_distances(feat, feat), d.float(), atol=1e-3, rtol=1e-4)


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["train.steps=7", "model.patch_moe.router.top_k=1"])
    assert cfg.train.steps == 7 and cfg.model.patch_moe_config().router.top_k == 1
    assert cfg.name == "tiny" and cfg.model.dim == 32  # tiny overrides default
    assert cfg.model.patch_moe_config().router.num_experts == 4  # inherited from default.yaml
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stpes'\] in train"):
        load_config(None, ["train.stpes=3"])
    with pytest.raises(ConfigError, match="num_experts=3 is not divisible by train.ep_size=2"):
        load_config(None, ["model.patch_moe.router.num_experts=3", "train.ep_size=2"])
    with pytest.raises(ConfigError, match="top_k=9 is larger than num_experts=4"):
        load_config(None, ["model.patch_moe.router.top_k=9"])
    with pytest.raises(ConfigError, match="model.moe_blocks=\\[5\\]"):
        load_config(None, ["model.moe_blocks=[5]"])
    with pytest.raises(ConfigError, match="train.k=1 must be >= 2"):
        load_config(None, ["train.k=1"])
    with pytest.raises(ConfigError, match="train.lr='fast' must be a number"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    loop = tmp_path / "a.yaml"
    loop.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(str(loop))


def test_lr_schedule_depends_on_step_only():
    t = RunConfig().train
    assert t.lr_at(0) == pytest.approx(t.lr / t.warmup_steps)
    assert t.lr_at(t.warmup_steps) == pytest.approx(t.lr)
    assert t.lr_at(t.steps) == pytest.approx(t.lr * t.min_lr_ratio)


ABLATIONS = sorted(glob.glob(os.path.join(ROOT, "configs/ablations/*.yaml")))


def test_seed_ablation_plan_is_complete():
    """Seed 000's plan: 2/3/4/5 scale experts, gate depth 1/2/3, temperature 0.5/1/2."""
    got = {"scales": set(), "gate_depth": set(), "temperature": set()}
    for path in ABLATIONS:
        ms = load_config(path).model.multiscale_config()
        got["scales"].add(len(ms.scales))
        got["gate_depth"].add(ms.gate_depth)
        got["temperature"].add(ms.temperature)
    assert {2, 3, 4, 5} <= got["scales"]
    assert {1, 2, 3} <= got["gate_depth"]
    assert {0.5, 1.0, 2.0} <= got["temperature"]
    assert len(ABLATIONS) == 10

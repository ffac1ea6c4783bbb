"""The multi-spectral ReID model: per-modality stems, a token-grid backbone whose FFN sublayers
can be PatchMoE, the thesis's multi-scale MoE fusion (4/8/16 windows), BNNeck and an ID classifier.

Legend: B batch, M modalities, D model dim, h x w token grid (image / stem_stride), S scales.

  rgb [B,3,H,W] --stem_rgb--+
  nir [B,1,H,W] --stem_nir--+--sum + LN--> x [B,h,w,D] --blocks--> [B,h,w,D]          (streams=fused)
  tir [B,1,H,W] --stem_tir--+
                            +--stack + LN--> x [3B,h,w,D] --blocks--> ... --head--> mean over modalities
                                                                                 (streams=per_modality)
  block:  x = x + DWConv(LN(x))          (spatial mixing, k x k depthwise)
          x = x + FFN(LN(x))             (FFN = PatchMoE or HierarchicalMoE in ``moe_blocks``, else MLP)
  head:   window features 4/8/16 (max of window means) --MultiScaleMoE--> f [B,D]          (fusion=flat)
          per modality: scale experts, a fine gate over its scales; a cross-modal coarse gate over
          the modalities --HierarchicalFusion--> f [B,D]                                    (fusion=hierarchical)
          BNNeck: f_bn = BN(f) (bias frozen); logits = W f_bn (no bias)
Training uses f (triplet) and logits (ID loss); retrieval uses f_bn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe import HierarchicalFusion, HierarchicalMoE, MoEOutput, MultiScaleMoE, PatchMoE, RoutingStats
from reid.config import ModelConfig
from reid.data import MODALITIES, Batch

MODALITY_INDEX = {m: i for i, m in enumerate(MODALITIES)}  # the coarse group of each modality (given)


class Stem(nn.Module):
    """One modality: two strided convs (stride s = s1 * s2) with a norm between: [B,c,H,W] -> [B,D,h,w]."""

    def __init__(self, channels: int, dim: int, stride: int):
        super().__init__()
        s1 = 2 if stride % 2 == 0 and stride > 2 else 1
        s2 = stride // s1
        self.net = nn.Sequential(
            nn.Conv2d(channels, dim // 2, kernel_size=max(3, s1 + 1), stride=s1, padding=max(3, s1 + 1) // 2),
            nn.GroupNorm(1, dim // 2),
            nn.GELU(),
            nn.Conv2d(dim // 2, dim, kernel_size=s2, stride=s2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DenseFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class BlockOutput:
    x: torch.Tensor  # [B, h, w, D]
    moe_stats: tuple[RoutingStats, ...]  # the routing of the block's MoE layer; empty for a dense FFN


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, use_moe: bool):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d)
        self.mix = nn.Conv2d(d, d, cfg.kernel, padding=cfg.kernel // 2, groups=d)
        self.norm2 = nn.LayerNorm(d)
        if not use_moe:
            self.ffn: nn.Module = DenseFFN(d, int(d * cfg.mlp_ratio), cfg.dropout)
        elif cfg.moe_kind == "hierarchical":
            self.ffn = HierarchicalMoE(cfg.hierarchical_config())
        else:
            self.ffn = PatchMoE(cfg.patch_moe_config())
        self.is_moe = use_moe
        self.given_modality = use_moe and cfg.moe_kind == "hierarchical" and \
            cfg.hierarchical_config().coarse_mode == "given"

    def forward(self, x_BhwD: torch.Tensor, modality_B: torch.Tensor | None = None) -> BlockOutput:
        """``modality_B``: each map's modality (per-modality streams), for hierarchical blocks that
        route coarse by it; None with fused streams."""
        y = self.norm1(x_BhwD).permute(0, 3, 1, 2)
        x_BhwD = x_BhwD + self.mix(y).permute(0, 2, 3, 1)
        h = self.norm2(x_BhwD)
        if self.is_moe:
            res: MoEOutput = self.ffn(h, modality_B) if self.given_modality else self.ffn(h)
            return BlockOutput(x_BhwD + res.out, (res.stats,))
        return BlockOutput(x_BhwD + self.ffn(h), ())


class BNNeck(nn.BatchNorm1d):
    """BatchNorm1d that normalises in fp32 whatever the weights' and input's dtype.

    Under bf16 training DeepSpeed casts parameters to bf16 but keeps buffers (the running mean
    and variance) in fp32: a plain BatchNorm then mixes dtypes and fails. Here the statistics
    stay fp32, the affine parameters are read as fp32 and the output comes back in the input's
    dtype, so the same module trains in fp32 and bf16 and loads either checkpoint."""

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        use_batch = self.training or not self.track_running_stats
        y = F.batch_norm(
            x_BD.float(),
            self.running_mean.float() if not use_batch and self.running_mean is not None else self.running_mean,
            self.running_var.float() if not use_batch and self.running_var is not None else self.running_var,
            self.weight.float() if self.weight is not None else None,
            self.bias.float() if self.bias is not None else None,
            use_batch, self.momentum, self.eps)
        return y.to(x_BD.dtype)


@dataclass(frozen=True)
class ReIDOutput:
    feat: torch.Tensor  # [B, D] before BNNeck (triplet loss)
    feat_bn: torch.Tensor  # [B, D] after BNNeck (retrieval)
    logits: torch.Tensor  # [B, num_classes]
    aux_loss: torch.Tensor  # sum of the MoE layers' balance losses
    moe_stats: tuple  # RoutingStats per PatchMoE block, in order
    fusion_stats: RoutingStats
    fusion_weights: torch.Tensor  # [B, S] the fusion's gate weight per scale; hierarchical: [B, M*S] per
    #                               (modality, scale), modality weight x scale weight (0 for an absent modality)


class ReIDModel(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.stems = nn.ModuleDict({m: Stem(c, cfg.dim, cfg.stem_stride) for m, c in MODALITIES.items()})
        self.norm_in = nn.LayerNorm(cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i in cfg.moe_blocks) for i in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.dim)
        self.fusion: nn.Module = MultiScaleMoE(cfg.multiscale_config()) if cfg.fusion == "flat" else \
            HierarchicalFusion(cfg.hierarchical_fusion_config())
        self.bnneck = BNNeck(cfg.dim)  # momentum 0.1 (a fixed factor: no host read of the batch count)
        self.bnneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(cfg.dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, batch: Batch, modalities: tuple[str, ...] = tuple(MODALITIES)) -> ReIDOutput:
        """``modalities``: those present (an absent one contributes nothing: with fused streams its
        stem is left out of the sum, with per-modality streams its map is not routed and the head
        averages over the present ones)."""
        maps = [self.stems[m](getattr(batch, m)) for m in modalities]  # M' x [B, D, h, w]
        modality_B = None
        if self.cfg.streams == "per_modality":
            x_NDhw = torch.cat(maps)  # N = M' * B maps, modality-major
            modality_B = torch.cat([torch.full((m.shape[0],), MODALITY_INDEX[name], device=m.device)
                                    for name, m in zip(modalities, maps)])
        else:
            x_NDhw = sum(maps)
        x = self.norm_in(x_NDhw.permute(0, 2, 3, 1))
        stats: list[RoutingStats] = []
        for block in self.blocks:
            res = block(x, modality_B)
            x = res.x
            stats.extend(res.moe_stats)
        if self.cfg.fusion == "hierarchical":  # the cross-modal gate renormalises over the present modalities
            fused = self.fusion(self.norm_out(x), tuple(MODALITY_INDEX[m] for m in modalities))
        else:
            fused = self.fusion(self.norm_out(x))
        feat, weights = fused.out, fused.weights
        if modality_B is not None and self.cfg.fusion == "flat":  # features averaged over the present modalities
            feat = feat.reshape(len(maps), -1, feat.shape[-1]).mean(0)
            weights = weights.reshape(len(maps), -1, weights.shape[-1]).mean(0)
        feat_bn = self.bnneck(feat)
        aux = fused.stats.aux_loss + sum((s.aux_loss for s in stats), torch.zeros((), device=feat.device))
        return ReIDOutput(feat, feat_bn, self.classifier(feat_bn), aux, tuple(stats), fused.stats, weights)

"""The thesis's multi-scale MoE fusion (dense soft fusion of 4/8/16 windows), the baseline, kept exactly.

Legend: B batch, H/W map size, D channels, S scales (= experts), Hd gating heads.

The thesis code, step by step:
  1. multi-scale features: s x s windows (thesis: 4, 8, 16) give one D-vector per scale
  2. gate:    weights = softmax(GatingNetwork(concat(features)) / T)            [B, S]
              (multi-head gating: the mean of the heads' softmaxes)
  3. experts: expert_s = ExpertNetwork(feature_s), one expert per scale          [S, B, D]
  4. fusion:  fused = sum_s weights[:, s] * expert_s                           [B, D]
The fusion is dense (every expert runs on every sample), as in the thesis.

Window features (step 1, which the thesis code leaves to the caller): for window size s the map is
average-pooled in non-overlapping s x s windows (a remainder narrower than s at the
bottom/right border is left out; a map smaller than s is one window), and the strongest
window response per channel is kept (max over windows). Small windows thus keep local
peaks while 16 x 16 approaches the global mean.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.balance import MoEOutput, routing_stats
from moe.config import MultiScaleMoEConfig
from moe.experts import ResidualMLPExperts
from moe.router import GateNetwork


def window_features(x_BHWD: torch.Tensor, scales: Sequence[int]) -> list[torch.Tensor]:
    """[B, H, W, D] -> one [B, D] vector per window size (max over s x s window means)."""
    if x_BHWD.dim() != 4:
        raise ValueError(f"expected a feature map [B, H, W, D], got shape {tuple(x_BHWD.shape)}")
    x_BDHW = x_BHWD.permute(0, 3, 1, 2)
    h, w = x_BDHW.shape[-2:]
    feats = []
    for s in scales:
        kernel = (min(s, h), min(s, w))
        pooled = F.avg_pool2d(x_BDHW, kernel, stride=kernel)
        feats.append(pooled.amax(dim=(-2, -1)))
    return feats


class MultiScaleMoE(nn.Module):
    """Gated fusion of per-scale features by one thesis ExpertNetwork per scale."""

    def __init__(self, cfg: MultiScaleMoEConfig):
        super().__init__()
        self.cfg = cfg
        s, d = len(cfg.scales), cfg.dim
        self.gate = GateNetwork(
            s * d, s, depth=cfg.gate_depth, hidden=(s * d) // 2,
            heads=cfg.num_heads, dropout=cfg.dropout,
        )
        self.experts = ResidualMLPExperts(s, d, cfg.expert_hidden, dropout=cfg.dropout)

    def forward(self, x_BHWD: torch.Tensor) -> MoEOutput:
        """Fuse a feature map [B, H, W, D]: its window features (step 1), then :meth:`fuse`."""
        return self.fuse(window_features(x_BHWD, self.cfg.scales))

    def fuse(self, feats: Sequence[torch.Tensor]) -> MoEOutput:
        """Steps 2-4 on S per-scale features [B, D] (the thesis code's own input)."""
        s = len(self.cfg.scales)
        if len(feats) != s:
            raise ValueError(f"MultiScaleMoE has {s} scale experts but got {len(feats)} features")
        b, d = feats[0].shape
        logits_HBS = self.gate(torch.cat(list(feats), dim=1))  # fp32
        weights_BS = (logits_HBS / self.cfg.temperature).softmax(-1).mean(0)

        x_SBD = torch.stack(list(feats))
        counts = torch.full((s,), b, dtype=torch.long, device=x_SBD.device)
        out_SBD = self.experts(x_SBD.reshape(s * b, 1, d), counts).reshape(s, b, d)
        fused_BD = torch.einsum("bs,sbd->bd", weights_BS.to(out_SBD.dtype), out_SBD)

        soft_load = weights_BS.detach().sum(0)
        stats = routing_stats(
            probs_NE=weights_BS, logits_HNE=logits_HBS, load_E=soft_load, kept_E=soft_load,
            active_slots=b * s, num_units=b, coefs=self.cfg.balance,
        )
        return MoEOutput(fused_BD, stats, weights_BS)

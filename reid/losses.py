"""ReID losses: label-smoothed identity cross-entropy and batch-hard triplet.

Legend: B batch, D feature dim, C identities.
The MoE balance losses come from the layers themselves (``ReIDOutput.aux_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def pairwise_distances(a_BD: torch.Tensor, b_ND: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [B, N], computed in fp32, clamped away from 0 for a finite sqrt gradient."""
    a, b = a_BD.float(), b_ND.float()
    d2 = a.square().sum(1, keepdim=True) + b.square().sum(1)[None] - 2 * a @ b.T
    return d2.clamp_min(1e-12).sqrt()


def batch_hard_triplet(feat_BD: torch.Tensor, pid_B: torch.Tensor, margin: float) -> torch.Tensor:
    """Hermans et al.: for each anchor, its farthest positive and closest negative.

    mean_a relu(max_{p: same id, p != a} d(a, p) - min_{n: other id} d(a, n) + margin).
    Anchors without a positive or without a negative in the batch are left out.
    """
    dist = pairwise_distances(feat_BD, feat_BD)
    same = pid_B[:, None] == pid_B[None, :]
    eye = torch.eye(len(pid_B), dtype=torch.bool, device=pid_B.device)
    pos_mask, neg_mask = same & ~eye, ~same
    hardest_pos = dist.masked_fill(~pos_mask, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(~neg_mask, float("inf")).amin(1)
    valid = pos_mask.any(1) & neg_mask.any(1)
    # Mean over valid anchors without a host sync (no boolean indexing); 0 when none is valid.
    per_anchor = torch.where(valid, F.relu(hardest_pos - hardest_neg + margin), torch.zeros_like(hardest_pos))
    return per_anchor.sum() / valid.sum().clamp_min(1)


@dataclass(frozen=True)
class LossParts:
    """The loss and its parts; the parts are detached 0-d tensors (read on the host when logged)."""

    total: torch.Tensor
    id: torch.Tensor
    triplet: torch.Tensor
    aux: torch.Tensor


def reid_loss(logits_BC, feat_BD, labels_B, aux, *, label_smoothing: float, margin: float, triplet_weight: float) -> LossParts:
    ce = F.cross_entropy(logits_BC.float(), labels_B, label_smoothing=label_smoothing)
    tri = batch_hard_triplet(feat_BD, labels_B, margin)
    total = ce + triplet_weight * tri + aux
    return LossParts(total, ce.detach(), tri.detach(), aux.detach().float())

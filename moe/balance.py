"""Balance losses and the per-step routing statistics every MoE layer reports.

Legend: N units, E experts, K slots per unit, H gating heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.config import BalanceConfig


def load_balance_loss(probs_NE: torch.Tensor, load_E: torch.Tensor) -> torch.Tensor:
    """Switch Transformer aux loss: E * sum_e f_e * P_e.

    f_e: fraction of live slots routed to expert e (no gradient); P_e: mean router prob.
    Equals 1 at perfect balance (for top-1; K-independent because f is a fraction).
    """
    e = probs_NE.shape[-1]
    f_E = load_E / load_E.sum().clamp_min(1.0)
    return e * (f_E.to(probs_NE.dtype) * probs_NE.mean(0)).sum()


def router_z_loss(logits_HNE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over heads and units of logsumexp(logits)^2."""
    return torch.logsumexp(logits_HNE.float(), dim=-1).square().mean()


def variance_loss(probs_NE: torch.Tensor) -> torch.Tensor:
    """The thesis multi-scale fusion's expert_balance_loss: torch.var of the mean expert weights (unbiased).

    With one expert the variance is undefined; it is 0 there (nothing to balance).
    """
    if probs_NE.shape[-1] < 2:
        return probs_NE.sum() * 0.0
    return torch.var(probs_NE.mean(0))


@dataclass(frozen=True)
class RoutingStats:
    """One layer's routing in one step. Every tensor is detached except ``aux_loss``.

    The statistics stay on the device (0-d tensors): a layer never makes the host wait for
    them; the trainer accumulates them as tensors and reads them at logging steps only.

    load:              [E] live slots routed to each expert (before capacity drops)
    kept:              [E] slots each expert actually processed
    dropped_fraction:  0-d, dropped live slots / live slots
    active_experts:    0-d, mean number of live slots (experts) per unit
    num_units:         units routed (patches or tokens), a host int
    load_balance_loss, z_loss, variance_loss: 0-d, the raw losses (for logging)
    aux_loss:          coefficient-weighted sum, with gradient; add it to the training loss
    coverage:          [COVERAGE_BINS] expert choice only: share of units taken by 0, 1, 2, 3 and
                       4 or more experts (share 0 is the analogue of dropped units); None otherwise
    """

    load: torch.Tensor
    kept: torch.Tensor
    dropped_fraction: torch.Tensor
    active_experts: torch.Tensor
    num_units: int
    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    variance_loss: torch.Tensor
    aux_loss: torch.Tensor
    pruned_units: int = 0  # units a dual-sparsity scorer pruned (never routed)
    coverage: torch.Tensor | None = None

    def scalars(self) -> torch.Tensor:
        """[5] dropped_fraction, active_experts, load_balance_loss, z_loss, variance_loss (one tensor)."""
        return torch.stack([self.dropped_fraction, self.active_experts, self.load_balance_loss, self.z_loss,
                            self.variance_loss]).float()

    def as_dict(self) -> dict[str, object]:
        """Plain-Python view for logs and JSON reports (reads the device: not for the hot path)."""
        dropped, active, lb, zl, vl = self.scalars().tolist()
        return {
            "load": self.load.tolist(),
            "kept": self.kept.tolist(),
            "dropped_fraction": dropped,
            "active_experts": active,
            "num_units": self.num_units,
            "load_balance_loss": lb,
            "z_loss": zl,
            "variance_loss": vl,
            "aux_loss": float(self.aux_loss.detach()),
            "pruned_units": self.pruned_units,
            **({"coverage": self.coverage.tolist()} if self.coverage is not None else {}),
        }


def routing_stats(
    *,
    probs_NE: torch.Tensor,
    logits_HNE: torch.Tensor | None,
    load_E: torch.Tensor,
    kept_E: torch.Tensor,
    active_slots: torch.Tensor | int,
    num_units: int,
    coefs: BalanceConfig,
    pruned_units: int = 0,
    coverage: torch.Tensor | None = None,
) -> RoutingStats:
    """Compute the balance losses and package the step's statistics (no host sync)."""
    lb = load_balance_loss(probs_NE, load_E)
    zl = router_z_loss(logits_HNE) if logits_HNE is not None else probs_NE.sum() * 0.0
    vl = variance_loss(probs_NE)
    aux = coefs.load_balance_coef * lb + coefs.z_loss_coef * zl + coefs.variance_coef * vl
    live = load_E.detach().float().sum()
    kept = kept_E.detach().float()
    dropped = torch.where(live > 0, (live - kept.sum()) / live.clamp_min(1e-12), torch.zeros_like(live))
    active = torch.as_tensor(active_slots, device=live.device).float() / max(num_units, 1)
    return RoutingStats(
        load=load_E.detach(),
        kept=kept,
        dropped_fraction=dropped,
        active_experts=active,
        num_units=num_units,
        load_balance_loss=lb.detach().float(),
        z_loss=zl.detach().float(),
        variance_loss=vl.detach().float(),
        aux_loss=aux,
        pruned_units=pruned_units,
        coverage=coverage,
    )


COVERAGE_BINS = 5  # units taken by 0, 1, 2, 3, 4+ experts


def coverage_shares(taken_N: torch.Tensor) -> torch.Tensor:
    """[COVERAGE_BINS] share of units taken by 0, 1, 2, 3 and 4+ experts, from [N] counts (no host sync)."""
    bins = taken_N.clamp(max=COVERAGE_BINS - 1)
    hist = torch.zeros(COVERAGE_BINS, device=taken_N.device).scatter_add_(0, bins, torch.ones_like(bins, dtype=torch.float))
    return hist / max(taken_N.numel(), 1)


@dataclass(frozen=True)
class MoEOutput:
    """What every MoE layer returns: its output and the step's routing statistics.

    out:     the layer output ([B, H, W, C] for PatchMoE, [B, D] for MultiScaleMoE)
    stats:   :class:`RoutingStats`; add ``stats.aux_loss`` to the training loss
    weights: the per-unit routing weights the layer used ([N, K] sparse, [B, S] for the
             dense multi-scale fusion: the thesis code's ``expert_weights``)
    """

    out: torch.Tensor
    stats: RoutingStats
    weights: torch.Tensor

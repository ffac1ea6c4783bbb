"""Routers: score every unit against every expert and pick its experts.

Legend
  N units (tokens or pooled patches), D gate input dim, E experts, K slots per unit
  (top_k, or k_max for dynamic k), H gating heads, F gate hidden width, C units per expert
  (expert choice).

Vocabulary
  logits  raw gate outputs, one set per head            [H, N, E]
  probs   scores after softmax/sigmoid, head-averaged   [N, E]
  weights the selected experts' (renormalised) probs    [N, K]
  slot_mask which of the K slots are live (dynamic k)   [N, K]

Token choice (the default) makes N x K slots: unit n's k-th expert. Expert choice
(``choice: expert``, :func:`expert_choice`) makes E x C slots: expert e's j-th unit, the C units
of the batch with the highest probs[:, e]; a unit may be taken by several experts or by none.
Its decision holds ids / weights / mask as [E, C] and the units taken in ``unit_ids`` [E, C].

All router math runs in fp32 whatever the input dtype. Ties in the selection go to the lower
expert index (a stable descending sort), so routing is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.config import RouterConfig


@dataclass(frozen=True)
class RoutingDecision:
    """What the router decided for one batch of units (read by dispatch and stats). Slots are
    [N, K] (token choice) or [E, C] (expert choice: ``unit_ids`` set)."""

    expert_ids: torch.Tensor  # [N, K] int64 | [E, C] (row e holds e)
    weights: torch.Tensor  # [N, K] fp32, zero on dead slots | [E, C] probs[unit, e]
    slot_mask: torch.Tensor  # [N, K] bool | [E, C] all True
    probs: torch.Tensor  # [N, E] fp32
    logits: torch.Tensor  # [H, N, E] fp32, before temperature
    all_live: bool = False  # every slot is live (plain top-k, expert choice): the row count is known on the host
    unit_ids: torch.Tensor | None = None  # [E, C] int64 the units each expert took (expert choice only)

    @property
    def num_units(self) -> int:
        return self.probs.shape[0]

    @property
    def expert_choice(self) -> bool:
        return self.unit_ids is not None

    def taken_counts(self) -> torch.Tensor:
        """[N] how many experts took each unit (expert choice; live slots only), a scatter-add: no host sync."""
        units_S = self.unit_ids.reshape(-1)
        return torch.zeros(self.num_units, dtype=torch.long, device=units_S.device).scatter_add_(
            0, units_S, self.slot_mask.reshape(-1).long())


def expert_capacity(num_units: int, k: int, num_experts: int, factor: float) -> int:
    """ceil(factor * N * K / E): rows one expert may take from one rank (at least 1)."""
    return max(1, math.ceil(factor * num_units * k / num_experts))


def expert_choice(probs_NE: torch.Tensor, logits_HNE: torch.Tensor, capacity: int) -> RoutingDecision:
    """Every expert takes the ``capacity`` units with the highest probs[:, e] (all N if fewer);
    a unit's weight for expert e is probs[n, e] (no renormalisation). Ties go to the lower unit
    index (a stable sort), so the choice is deterministic. No host sync: C is a host int."""
    n, e = probs_NE.shape
    c = min(capacity, n)
    order_EN = torch.sort(probs_NE.detach().t(), dim=-1, descending=True, stable=True).indices
    units_EC = order_EN[:, :c]
    weights_EC = probs_NE.t().gather(1, units_EC)
    ids_EC = torch.arange(e, device=probs_NE.device)[:, None].expand(e, c)
    mask_EC = torch.ones(e, c, dtype=torch.bool, device=probs_NE.device)
    return RoutingDecision(ids_EC, weights_EC, mask_EC, probs_NE, logits_HNE, all_live=True, unit_ids=units_EC)


def _uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


class GateNetwork(nn.Module):
    """H independent gating MLPs computed together (stacked weights, one einsum per layer).

    depth 1: Linear(D, E)                                           (the Patch-MoE gate)
    depth 2: Linear(D, F) - LN - GELU - Dropout - Linear(F, E)      (the multi-scale fusion's GatingNetwork)
    depth 3: Linear(D, F) - LN - GELU - Dropout - Linear(F, F) - LN - GELU - Dropout - Linear(F, E)
    Always computes in fp32.
    """

    def __init__(self, in_dim: int, num_out: int, *, depth: int, hidden: int, heads: int, dropout: float):
        super().__init__()
        dims = [in_dim] + [hidden] * (depth - 1) + [num_out]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norm_w = nn.ParameterList()
        self.norm_b = nn.ParameterList()
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            self.weights.append(nn.Parameter(_uniform_(torch.empty(heads, a, b), a)))
            self.biases.append(nn.Parameter(_uniform_(torch.empty(heads, 1, b), a)))
            if i < depth - 1:
                self.norm_w.append(nn.Parameter(torch.ones(heads, 1, b)))
                self.norm_b.append(nn.Parameter(torch.zeros(heads, 1, b)))
        self.dropout = dropout

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        """[N, D] -> logits [H, N, E], fp32."""
        h = x_ND.float().unsqueeze(0)  # [1, N, D] broadcast over heads
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.matmul(h, w.float()) + b.float()  # [H, N, out]
            if i < last:
                h = F.layer_norm(h, h.shape[-1:]) * self.norm_w[i].float() + self.norm_b[i].float()
                h = F.dropout(F.gelu(h), self.dropout, self.training)
        return h


class Router(nn.Module):
    """Scores units, selects K experts each, and reports what it chose."""

    def __init__(self, cfg: RouterConfig, input_dim: int):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.gate_hidden or max(1, input_dim // 2)
        self.gate = GateNetwork(
            input_dim, cfg.num_experts, depth=cfg.gate_depth, hidden=hidden,
            heads=cfg.num_heads, dropout=cfg.gate_dropout,
        )
        # Aux-loss-free balancing: added to selection scores only, never to weights.
        self.register_buffer("selection_bias", torch.zeros(cfg.num_experts), persistent=True)

    def score(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (probs [N, E], logits [H, N, E]): the scores, before any selection."""
        cfg = self.cfg
        x = x_ND.float()
        if self.training and cfg.noise == "jitter" and cfg.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1 - cfg.jitter_eps, 1 + cfg.jitter_eps)
        logits_HNE = self.gate(x)
        noisy = logits_HNE
        if self.training and cfg.noise == "gaussian" and cfg.noise_std > 0:
            noisy = logits_HNE + torch.randn_like(logits_HNE) * cfg.noise_std
        scaled = noisy / cfg.temperature
        scores = scaled.softmax(-1) if cfg.score_fn == "softmax" else scaled.sigmoid()
        return scores.mean(0), logits_HNE

    def forward(self, x_ND: torch.Tensor, capacity: int | None = None) -> RoutingDecision:
        """``capacity``: C, the units each expert takes (expert choice only; the caller sizes it)."""
        cfg = self.cfg
        probs_NE, logits_HNE = self.score(x_ND)
        if cfg.choice == "expert":
            if capacity is None:
                raise ValueError("expert-choice routing needs the capacity C (units per expert) from its layer")
            return expert_choice(probs_NE, logits_HNE, capacity)
        ids_NK, mask_NK = self._select(probs_NE.detach())
        weights_NK = probs_NE.gather(1, ids_NK) * mask_NK
        if cfg.normalize_topk:
            weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True).clamp_min(1e-20)
        return RoutingDecision(ids_NK, weights_NK, mask_NK, probs_NE, logits_HNE,
                               all_live=cfg.dynamic_top_p is None)

    def _select(self, probs_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick expert ids [N, K] and live-slot mask [N, K] (no gradient flows here)."""
        cfg = self.cfg
        k = cfg.max_k
        select = probs_NE + self.selection_bias.float()
        order_NE = torch.sort(select, dim=-1, descending=True, stable=True).indices
        ids_NK = order_NE[:, :k]
        if cfg.dynamic_top_p is None:
            return ids_NK, torch.ones_like(ids_NK, dtype=torch.bool)
        # Dynamic k: keep expert j while the mass before it is still short of p.
        mass_NK = probs_NE.gather(1, ids_NK)
        before_NK = mass_NK.cumsum(-1) - mass_NK
        k_N = (before_NK < cfg.dynamic_top_p).sum(-1).clamp(cfg.k_min, k)
        mask_NK = torch.arange(k, device=ids_NK.device).unsqueeze(0) < k_N.unsqueeze(1)
        return ids_NK, mask_NK

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower the others.

        ``load_E`` is the number of slots each expert received (summed over the data-parallel
        group by the caller when there is one). Call once per optimizer step.
        """
        rate = self.cfg.bias_update_rate
        if rate <= 0:
            return
        load = load_E.float()
        self.selection_bias += rate * torch.sign(load.mean() - load)

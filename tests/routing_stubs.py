"""Single-process stand-ins for the routing side of a layer: a fixed router, fixed expert functions,
and a dense loop over experts to compare dispatch / combine with.

Legend: N units, K slots per unit, E experts, L points per unit, C channels.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moe.router import RoutingDecision
from tests.reference import capacity_keep


def fixed_decision(n: int, k: int, e: int, seed: int, dead: float = 0.0) -> RoutingDecision:
    """A routing of N units to K distinct experts each, drawn from ``seed``. With ``dead`` > 0 a unit
    keeps only its first 1..K slots (as dynamic k does; about a fraction ``dead`` of the slots after
    the first are off), so the dispatcher must read the row count."""
    g = torch.Generator().manual_seed(seed)
    ids_NK = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]) if n else torch.zeros(0, k).long()
    w_NK = torch.rand(n, k, generator=g) + 0.1
    mask_NK = torch.ones(n, k, dtype=torch.bool)
    if dead and k > 1:
        live_N = 1 + (torch.rand(n, k - 1, generator=g) >= dead).sum(1)
        mask_NK = torch.arange(k)[None] < live_N[:, None]
    w_NK = (w_NK / w_NK.sum(1, keepdim=True)) * mask_NK
    probs = torch.zeros(n, e).scatter_(1, ids_NK, w_NK) if n else torch.zeros(0, e)
    return RoutingDecision(ids_NK, w_NK, mask_NK, probs, probs.log1p()[None], all_live=not dead)


def expert_fn(e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` as a fixed, distinct, differentiable function of its rows."""
    return x * (1.0 + 0.5 * e) + 0.01 * e + torch.tanh(x) * (e % 3)


def apply_experts(rows_ULC: torch.Tensor, counts: list[int], first_expert: int) -> torch.Tensor:
    """What a rank's experts do with the rows it received, sorted by local expert."""
    parts = rows_ULC.split(counts)
    return torch.cat([expert_fn(first_expert + i, p) for i, p in enumerate(parts)]) if parts else rows_ULC


def kept_slots(decision: RoutingDecision, e: int, capacity: int | None, priority: str = "order") -> set:
    """(n, k) slots left after the capacity cut, by tests/reference.py's loop."""
    n, k = decision.expert_ids.shape
    routes = [[(int(decision.expert_ids[i, j]), decision.weights[i, j]) for j in range(k) if decision.slot_mask[i, j]]
              for i in range(n)]
    return capacity_keep(routes, e, capacity, priority) if n else set()  # live slots lead: same indices


def dense_reference(x_NLC: torch.Tensor, decision: RoutingDecision, kept: set) -> torch.Tensor:
    """out[n] = sum over n's kept slots k of weight[n, k] * expert[id[n, k]](x[n]): one unit at a time."""
    outs = []
    for i in range(x_NLC.shape[0]):
        y = torch.zeros_like(x_NLC[i])
        for j in range(decision.expert_ids.shape[1]):
            if (i, j) in kept:
                y = y + decision.weights[i, j] * expert_fn(int(decision.expert_ids[i, j]), x_NLC[i])
        outs.append(y)
    return torch.stack(outs) if outs else x_NLC * 0  # no units: still part of the graph


def expected_rows(xs_NLC: list, plans: list, first: int, count: int) -> list:
    """Per local expert first..first+count-1: the rows it must receive, source rank by source rank,
    each source's rows in its plan order (what the regroup promises the grouped matmul)."""
    out = []
    for e in range(first, first + count):
        rows = []
        for x_NLC, plan in zip(xs_NLC, plans):
            starts = torch.cumsum(plan.counts, 0) - plan.counts
            units = plan.unit_of_row[int(starts[e]):int(starts[e] + plan.counts[e])]
            rows.append(x_NLC[units])
        out.append(torch.cat(rows))
    return out


class FixedRouter(nn.Module):
    """A router whose choice is a fixed function of the pooled unit: top-k of a frozen projection."""

    def __init__(self, dim: int, num_experts: int, k: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj_CE", torch.randn(dim, num_experts, generator=g))
        self.k = k

    def forward(self, pooled_NC: torch.Tensor, capacity: int | None = None) -> RoutingDecision:
        logits_NE = pooled_NC.float() @ self.proj_CE
        probs_NE = logits_NE.softmax(-1)
        w_NK, ids_NK = probs_NE.topk(self.k, dim=-1)
        w_NK = w_NK / w_NK.sum(-1, keepdim=True)
        return RoutingDecision(ids_NK, w_NK, torch.ones_like(ids_NK, dtype=torch.bool), probs_NE, logits_NE[None],
                               all_live=True)

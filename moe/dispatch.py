"""Permutation of routed units to experts, and the dispatcher interface.

Legend
  N units, K slots per unit, S = N*K slots, E experts (global), R kept rows,
  L points per unit, C channels, U units an expert rank receives.

A *slot* is one (unit, k) pair: the unit's k-th choice. :func:`plan_dispatch` sorts the live
slots by expert, applies the capacity (dropping the overflow) and returns a frozen
:class:`DispatchPlan`. A dispatcher then moves the planned rows to the ranks holding their
experts (``dispatch``) and brings the expert outputs back in plan order (``combine``);
:func:`unpermute` finally weights them and sums each unit's slots.

Capacity priority when an expert overflows
  "order": all first choices before any second choice (GShard), units in index order;
  "score": highest routing weight first (ties as in "order").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from moe.combine import slot_sum
from moe.indexing import gather_rows
from moe.router import RoutingDecision, expert_capacity
from moe.units import PatchView, take_units


@dataclass(frozen=True)
class DispatchPlan:
    """Which slot feeds which row; read by the dispatcher and by :func:`unpermute`.

    Everything here stays on the device. The number of kept rows R is known on the host without
    reading the device only in dropless top-k (R = N*K); otherwise (dynamic k, capacity) the
    dispatcher reads it once, together with the split sizes it needs anyway, and hands the
    resolved plan (:meth:`with_rows`) back in its metadata: one host sync per layer at most.
    """

    order_S: torch.Tensor  # [S] slot index n*K + k: kept slots first, sorted by expert; then the rest
    counts: torch.Tensor  # [E] kept rows per expert
    routed: torch.Tensor  # [E] live slots per expert before the capacity cut
    capacity: int | None  # rows an expert may take from this rank (None = dropless)
    num_units: int  # N
    top_k: int  # K
    num_rows: int | None = None  # R, once known on the host
    unit_S: torch.Tensor | None = None  # [S] unit of each slot (expert choice); None: slot // K
    static_capacity: int | None = None  # every expert gets exactly C rows (padding included): R = E * C
    row_valid: torch.Tensor | None = None  # [R] False on padding rows (static capacity plans); None: all real

    @property
    def kept(self) -> torch.Tensor:
        """[E] real rows per expert (``counts`` less any padding)."""
        if self.row_valid is None:
            return self.counts
        return self.row_valid.view(self.counts.shape[0], -1).sum(1)

    @property
    def one_row_per_slot(self) -> bool:
        """Every slot n*K + k has exactly one row (dropless top-k): the combine's fast paths apply."""
        return (self.unit_S is None and self.row_valid is None and self.num_rows is not None
                and self.num_rows == self.num_units * self.top_k)

    def with_rows(self, num_rows: int) -> "DispatchPlan":
        """This plan with R set (from counts the dispatcher read)."""
        return dataclasses.replace(self, num_rows=int(num_rows))

    def host_counts(self) -> tuple["DispatchPlan", list[int]]:
        """Read ``counts`` on the host (one sync) and return the resolved plan with them."""
        counts = self.counts.tolist()
        return self.with_rows(sum(counts)), counts

    @property
    def slot_of_row(self) -> torch.Tensor:
        """[R] slot index of each kept row, rows sorted by expert."""
        if self.num_rows is None:
            raise RuntimeError("the dispatch plan's row count is not known yet: the dispatcher resolves it "
                               "(DispatchPlan.with_rows) before rows are taken")
        return self.order_S[: self.num_rows]

    @property
    def unit_of_row(self) -> torch.Tensor:
        """[R] unit index n of each kept row."""
        if self.unit_S is not None:
            return self.unit_S[self.slot_of_row]
        return self.slot_of_row // self.top_k


def live_expert_of_slot(expert_ids_NK: torch.Tensor, slot_mask_NK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[S] expert id of each slot n*K + k; a dead slot gets ``num_experts`` (sorts last, counts nowhere)."""
    return torch.where(slot_mask_NK, expert_ids_NK, num_experts).reshape(-1)


def slot_counts(expert_ids_NK: torch.Tensor, slot_mask_NK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 live slots routed to each expert (before any capacity cut): the rows each expert
    receives in dropless dispatch, and the load the balance losses see. A scatter-add: no host
    sync (``bincount`` reads the largest id first on CUDA)."""
    expert_S = live_expert_of_slot(expert_ids_NK, slot_mask_NK, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_S.device)
    return counts.scatter_add_(0, expert_S, torch.ones_like(expert_S))[:num_experts]


def plan_dispatch(
    decision: RoutingDecision, num_experts: int, capacity: int | None, priority: str = "order", static: bool = False
) -> DispatchPlan:
    """Sort live slots by expert and cut each expert at ``capacity`` (no cut if None). No host sync.
    An expert-choice decision is its own plan: its [E, C] slots are sorted by expert already, every
    expert keeps all C, and the row count E * C is known on the host."""
    if decision.expert_choice:
        e, c = decision.unit_ids.shape
        device = decision.unit_ids.device
        counts = torch.full((e,), c, dtype=torch.long, device=device)
        return DispatchPlan(torch.arange(e * c, device=device), counts, counts, c, decision.num_units, c, e * c,
                            unit_S=decision.unit_ids.reshape(-1), static_capacity=c)
    ids_NK, mask_NK = decision.expert_ids, decision.slot_mask
    n, k = ids_NK.shape
    device = ids_NK.device
    # Priority sequence of slot indices: choice rank k first, then unit index n.
    prio_S = torch.arange(n * k, device=device).view(n, k).t().reshape(-1)
    if priority == "score":
        w_S = decision.weights.detach().reshape(-1)[prio_S]
        prio_S = prio_S[torch.sort(-w_S, stable=True).indices]
    expert_S = live_expert_of_slot(ids_NK, mask_NK, num_experts)  # dead slots sort last
    order_S = prio_S[torch.sort(expert_S[prio_S], stable=True).indices]
    routed_E = slot_counts(ids_NK, mask_NK, num_experts)
    if capacity is None:
        num_rows = n * k if decision.all_live else None
        return DispatchPlan(order_S, routed_E, routed_E, None, n, k, num_rows)
    sorted_expert = expert_S[order_S]
    starts_E = torch.cumsum(routed_E, 0) - routed_E
    pos = torch.arange(n * k, device=device) - starts_E[sorted_expert.clamp(max=num_experts - 1)]
    keep = (sorted_expert < num_experts) & (pos < capacity)
    order_S = order_S[torch.sort((~keep).to(torch.uint8), stable=True).indices]  # kept rows first
    plan = DispatchPlan(order_S, routed_E.clamp(max=capacity), routed_E, capacity, n, k)
    return pad_to_capacity(plan) if static and n * k > 0 else plan


def pad_to_capacity(plan: DispatchPlan) -> DispatchPlan:
    """The static form of a capacity plan: every expert's block padded to exactly C rows (a padding
    row repeats slot 0 and is marked invalid: its weight is zero), so R = E * C is known on the host
    and the exchange needs no count all-to-all. No host sync."""
    e, c = plan.counts.shape[0], plan.capacity
    device = plan.counts.device
    kept_E = plan.counts
    start_E = torch.cumsum(kept_E, 0) - kept_E
    j_C = torch.arange(c, device=device)
    valid_EC = j_C[None, :] < kept_E[:, None]
    pos_EC = (start_E[:, None] + j_C[None, :]).clamp(max=plan.order_S.shape[0] - 1)
    slot_EC = torch.where(valid_EC, plan.order_S[pos_EC], torch.zeros_like(pos_EC))
    full = torch.full((e,), c, dtype=torch.long, device=device)
    return dataclasses.replace(plan, order_S=slot_EC.reshape(-1), counts=full, num_rows=e * c, static_capacity=c,
                               row_valid=valid_EC.reshape(-1))


def unpermute(rows_RLC: torch.Tensor, plan: DispatchPlan, weights_NK: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each unit's expert outputs: rows [R, L, C] -> units [N, L, C].

    A dropped slot has no row and contributes zero. When every slot has a row (dropless
    top-k) the sum is one gather and one batched matmul (:func:`moe.combine.slot_sum`).
    ``weights_NK`` are the decision's slot weights ([E, C] for expert choice: a unit no expert
    took comes out zero).
    """
    n, k = weights_NK.shape
    if plan.unit_S is None and plan.row_valid is None and rows_RLC.shape[0] == n * k and n * k > 0:
        out_ND = slot_sum(rows_RLC.reshape(n * k, -1), weights_NK, plan.slot_of_row)
        return out_ND.view(n, *rows_RLC.shape[1:])
    w_R = gather_rows(weights_NK.reshape(-1), plan.slot_of_row).to(rows_RLC.dtype)
    if plan.row_valid is not None:  # padding rows add nothing
        w_R = w_R * plan.row_valid.to(w_R.dtype)
    out = rows_RLC.new_zeros(plan.num_units, *rows_RLC.shape[1:])
    return out.index_add(0, plan.unit_of_row, rows_RLC * w_R[:, None, None])


class Dispatcher(Protocol):
    """Moves planned rows to the experts' ranks and back. ``moe/`` sees ranks only here.

    ``uniform_units``: every rank of the expert group routes the same number of units per call
    (msmoe's training and evaluation batches are equal per rank): a layer may then size its
    capacity from its own unit count with no collective, and a static plan (``static_capacity``)
    is exchanged with split sizes known on the host: no count all-to-all, no host read."""

    num_local_experts: int
    uniform_units: bool

    def capacity(self, num_units: int, k: int, num_experts: int, factor: float) -> int:
        """Capacity per expert per rank, identical on every rank of the expert group."""

    def dispatch(self, units_NLC: "torch.Tensor | PatchView",
                 plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Units: a tensor [N, L, C] or a map read in place (gather either with ``take_units``).

        -> (rows for the local experts [U, L, C] sorted by local expert, counts [E_local], meta).

        ``meta.plan`` is ``plan`` with its row count resolved (read by the combine step);
        ``meta.host_counts`` the local counts as a host list when the dispatcher read them."""

    def combine(self, expert_out_ULC: torch.Tensor, meta: Any) -> torch.Tensor:
        """Expert outputs back to this rank, in plan row order: [R, L, C]."""


@dataclass(frozen=True)
class LocalMeta:
    plan: DispatchPlan  # resolved: R known
    host_counts: list | None  # [E] rows per expert when they were read (None: not needed)


class LocalDispatcher:
    """Single rank: every expert is local, nothing moves."""

    first_expert = 0  # global id of the first local expert
    uniform_units = True  # one rank: trivially

    def __init__(self, num_experts: int):
        self.num_local_experts = num_experts

    def capacity(self, num_units: int, k: int, num_experts: int, factor: float) -> int:
        return expert_capacity(num_units, k, num_experts, factor)

    def dispatch(self, units_NLC: "torch.Tensor | PatchView",
                 plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor, LocalMeta]:
        host = None
        if plan.static_capacity is not None:  # E x C rows, known on the host
            host = [plan.static_capacity] * plan.counts.shape[0]
        elif plan.num_rows is None:  # dynamic k or capacity: the one host read of this layer
            plan, host = plan.host_counts()
        rows = take_units(units_NLC, plan.unit_of_row)
        return rows, plan.counts, LocalMeta(plan, host)

    def combine(self, expert_out_ULC: torch.Tensor, meta: LocalMeta) -> torch.Tensor:
        return expert_out_ULC

"""Expert-parallel dispatch at patch granularity: whole patches move by all-to-all.

Legend
  P ep_size, E global experts, El = E / P local experts, R rows this rank routes (kept slots),
  U rows this rank's experts receive, L points per patch, C channels.

The payload row is one routed patch, [L * C] wide: never per-point metadata. Per call:
  1. counts:  each rank tells every other how many rows it sends to each of their experts
              (an all-to-all of E int64 counts)                       -> recv_counts [P, El]
  2. payload: rows sorted by global expert = by destination rank, exactly the routed rows
              (dropless) or at most ``capacity`` per expert (capacity mode), split by rank
  3. regroup: received rows (source-major) are reordered expert-major for the grouped matmul
combine() undoes 3 and 2. Capacity is computed from the largest unit count in the group, so
every rank applies the same capacity. A rank may send or receive zero rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe.dispatch import DispatchPlan, LocalDispatcher, expert_capacity
from moe.indexing import gather_rows
from moe.units import PatchView, take_units
from parallel.all_to_all import CommCounter, all_to_all_rows, collective, exchange
from parallel.groups import ExpertGroup, ParallelGroups


@dataclass(frozen=True)
class AllToAllMeta:
    """What combine() needs to send expert outputs back (produced by dispatch())."""

    send_splits: list  # [P] rows this rank sent to each rank
    recv_splits: list  # [P] rows this rank received from each rank
    order: torch.Tensor  # [U] received-row index of each expert-major row
    row_shape: tuple  # (L, C)
    plan: DispatchPlan  # the caller's plan, row count resolved
    host_counts: list  # [El] rows each local expert received


class AllToAllDispatcher:
    """Experts sharded over an expert group (``ep``: who holds which); patches exchanged by all-to-all."""

    def __init__(self, ep: ExpertGroup, counter: CommCounter | None = None):
        self.ep = ep
        self.counter = counter if counter is not None else CommCounter()

    @property
    def num_local_experts(self) -> int:
        return self.ep.num_local_experts

    @property
    def first_expert(self) -> int:
        """Global id of this rank's first local expert."""
        return self.ep.first_expert

    def capacity(self, num_units: int, k: int, num_experts: int, factor: float) -> int:
        n = torch.tensor([num_units], dtype=torch.long, device=self.ep.device)
        collective("all-reduce of the patch count (capacity)", dist.all_reduce, n, op=dist.ReduceOp.MAX,
                   group=self.ep.group, host_reads=True)
        return expert_capacity(int(n), k, num_experts, factor)

    def dispatch(self, units_NLC: "torch.Tensor | PatchView", plan: DispatchPlan):
        p, el = self.ep.size, self.ep.num_local_experts
        _, l, c = units_NLC.shape
        counts_E = plan.counts.to(self.ep.device)
        recv_PE = exchange(counts_E, [el] * p, [el] * p, self.ep.group,
                           "all-to-all of per-expert patch counts (dispatch)", host_reads=True).view(p, el)
        # The one host read of this layer: what this rank sends per expert and receives per (rank, expert).
        host = torch.cat([counts_E, recv_PE.reshape(-1)]).tolist()
        sent_E, recv_host = host[: p * el], host[p * el:]
        send_splits = [sum(sent_E[r * el:(r + 1) * el]) for r in range(p)]
        recv_splits = [sum(recv_host[r * el:(r + 1) * el]) for r in range(p)]
        local_host = [sum(recv_host[r * el + e] for r in range(p)) for e in range(el)]
        plan = plan.with_rows(sum(send_splits)) if plan.num_rows is None else plan

        rows_RD = take_units(units_NLC, plan.unit_of_row).reshape(-1, l * c)
        recv_UD = all_to_all_rows(rows_RD, send_splits, recv_splits, self.ep.group, self.counter, self.ep.rank,
                                  self.ep.ranks)

        total = sum(recv_splits)
        local_of_row = torch.arange(el, device=recv_PE.device).repeat(p)
        local_of_row = torch.repeat_interleave(local_of_row, recv_PE.reshape(-1), output_size=total)
        order = torch.sort(local_of_row.to(units_NLC.device), stable=True).indices
        expert_in = gather_rows(recv_UD, order).reshape(-1, l, c)
        local_counts = recv_PE.sum(0).to(units_NLC.device)
        return expert_in, local_counts, AllToAllMeta(send_splits, recv_splits, order, (l, c), plan, local_host)

    def combine(self, expert_out_ULC: torch.Tensor, meta: AllToAllMeta) -> torch.Tensor:
        l, c = meta.row_shape
        out_UD = expert_out_ULC.reshape(-1, l * c)
        source_major = torch.empty_like(out_UD).index_copy(0, meta.order, out_UD)
        back = all_to_all_rows(source_major, meta.recv_splits, meta.send_splits, self.ep.group,
                               self.counter, self.ep.rank, self.ep.ranks)
        return back.reshape(-1, l, c)


def build_dispatcher(ep: "ExpertGroup | ParallelGroups", counter: CommCounter | None = None):
    """The dispatcher for an expert group (or the groups' ``ep``): all-to-all over it, or local when it has one rank."""
    if isinstance(ep, ParallelGroups):
        ep = ep.ep
    if ep.size == 1:
        return LocalDispatcher(ep.num_experts)
    return AllToAllDispatcher(ep, counter)

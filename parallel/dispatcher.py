"""Expert-parallel dispatch at patch granularity: whole patches move by all-to-all.

Legend
  P ep_size, E global experts, El = E / P local experts, R rows this rank routes (kept slots),
  U rows this rank's experts receive, L points per patch, C channels.

The payload row is one routed patch, [L * C] wide: never per-point metadata. ``dispatch`` runs
three steps, each a stage of the layer's timer (nested in its ``dispatch`` stage, so that
total stays what it was):
  1. dispatch.counts:  each rank tells every other how many rows it sends to each of their
                       experts (an all-to-all of E int64 counts) and reads the split sizes on
                       the host, the layer's one host read                    -> Splits
  2. dispatch.send:    rows sorted by global expert = by destination rank, exactly the routed
                       rows (dropless) or at most ``capacity`` per expert (capacity mode),
                       split by rank: the payload all-to-all                  -> [U, L*C]
  3. dispatch.regroup: received rows (source-major) reordered expert-major for the grouped
                       matmul                                                 -> [U, L, C]
``combine`` undoes 3 (combine.regroup) and 2 (combine.send). Capacity is computed from the
largest unit count in the group, so every rank applies the same capacity. A rank may send or
receive zero rows.

Static plans (``uniform_units``: every rank routes the same number of units, as msmoe's trainer
guarantees): expert choice and capacity mode padded to [E, C] send exactly C rows to every
expert, so step 1 needs no exchange and no host read: every split is El * C, known on the host
(zero host syncs in the layer). The capacity is then sized from this rank's own unit count, the
same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.timing import StageTimer
from moe.dispatch import DispatchPlan, LocalDispatcher, expert_capacity
from moe.indexing import gather_rows
from moe.timing import NullTimer
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


@dataclass(frozen=True)
class Splits:
    """The counts step's result: who sends how many rows to whom (host lists) and, on the device,
    how many each local expert receives from each rank."""

    send_splits: list  # [P] rows this rank sends to each rank
    recv_splits: list  # [P] rows this rank receives from each rank
    recv_PE: torch.Tensor  # [P, El] rows received from rank p for local expert e
    host_counts: list  # [El] rows each local expert receives (host)
    plan: DispatchPlan  # the caller's plan, row count resolved


class AllToAllDispatcher:
    """Experts sharded over an expert group (``ep``: who holds which); patches exchanged by all-to-all.

    ``timer``: the layer's stage timer (the same object), for the dispatch and combine steps.
    ``uniform_units``: the caller promises the same unit count on every rank of the group per call
    (see the module docstring); False keeps the count exchange for every plan."""

    def __init__(self, ep: ExpertGroup, counter: CommCounter | None = None, timer: StageTimer | None = None,
                 uniform_units: bool = False):
        self.ep = ep
        self.counter = counter if counter is not None else CommCounter()
        self.timer = timer if timer is not None else NullTimer()
        self.uniform_units = uniform_units

    @property
    def num_local_experts(self) -> int:
        return self.ep.num_local_experts

    @property
    def first_expert(self) -> int:
        """Global id of this rank's first local expert."""
        return self.ep.first_expert

    def capacity(self, num_units: int, k: int, num_experts: int, factor: float) -> int:
        """The group's one capacity: from this rank's own count where every rank routes alike
        (``uniform_units``: no collective), else from the largest count in the group (an all-reduce)."""
        if self.uniform_units:
            return expert_capacity(num_units, k, num_experts, factor)
        n = torch.tensor([num_units], dtype=torch.long, device=self.ep.device)
        collective("all-reduce of the patch count (capacity)", dist.all_reduce, n, op=dist.ReduceOp.MAX,
                   group=self.ep.group, host_reads=True)
        return expert_capacity(int(n), k, num_experts, factor)

    def dispatch(self, units_NLC: "torch.Tensor | PatchView", plan: DispatchPlan):
        """-> (rows [U, L, C] sorted by local expert, counts [El], :class:`AllToAllMeta`)."""
        with self.timer.stage("dispatch.counts"):
            splits = self.exchange_counts(plan)
        with self.timer.stage("dispatch.send"):
            recv_UD = self.send(units_NLC, splits)
        with self.timer.stage("dispatch.regroup"):
            return self.regroup(recv_UD, splits, units_NLC.shape[1:], units_NLC.device)

    def exchange_counts(self, plan: DispatchPlan) -> Splits:
        """Step 1: the count all-to-all and the one host read of this layer (none for a static plan)."""
        p, el = self.ep.size, self.ep.num_local_experts
        if self.uniform_units and plan.static_capacity is not None:
            c = plan.static_capacity
            recv_PE = torch.full((p, el), c, dtype=torch.long, device=self.ep.device)
            return Splits([el * c] * p, [el * c] * p, recv_PE, [p * c] * el, plan)
        counts_E = plan.counts.to(self.ep.device)
        recv_PE = exchange(counts_E, [el] * p, [el] * p, self.ep.group,
                           "all-to-all of per-expert patch counts (dispatch)", host_reads=True).view(p, el)
        # What this rank sends per expert and receives per (rank, expert), read together.
        host = torch.cat([counts_E, recv_PE.reshape(-1)]).tolist()
        sent_E, recv_host = host[: p * el], host[p * el:]
        send_splits = [sum(sent_E[r * el:(r + 1) * el]) for r in range(p)]
        recv_splits = [sum(recv_host[r * el:(r + 1) * el]) for r in range(p)]
        local_host = [sum(recv_host[r * el + e] for r in range(p)) for e in range(el)]
        plan = plan.with_rows(sum(send_splits)) if plan.num_rows is None else plan
        return Splits(send_splits, recv_splits, recv_PE, local_host, plan)

    def send(self, units_NLC: "torch.Tensor | PatchView", splits: Splits) -> torch.Tensor:
        """Step 2: the planned rows to their experts' ranks: [R, L*C] -> [U, L*C], source-major."""
        _, l, c = units_NLC.shape
        rows_RD = take_units(units_NLC, splits.plan.unit_of_row).reshape(-1, l * c)
        return all_to_all_rows(rows_RD, splits.send_splits, splits.recv_splits, self.ep.group, self.counter,
                               self.ep.rank, self.ep.ranks)

    def regroup(self, recv_UD: torch.Tensor, splits: Splits, row_shape: tuple, device: torch.device):
        """Step 3: source-major rows reordered expert-major -> (rows [U, L, C], counts [El], meta)."""
        p, el = self.ep.size, self.ep.num_local_experts
        l, c = row_shape
        recv_PE = splits.recv_PE
        local_of_row = torch.arange(el, device=recv_PE.device).repeat(p)
        local_of_row = torch.repeat_interleave(local_of_row, recv_PE.reshape(-1), output_size=sum(splits.recv_splits))
        order = torch.sort(local_of_row.to(device), stable=True).indices
        expert_in = gather_rows(recv_UD, order).reshape(-1, l, c)
        local_counts = recv_PE.sum(0).to(device)
        meta = AllToAllMeta(splits.send_splits, splits.recv_splits, order, (l, c), splits.plan, splits.host_counts)
        return expert_in, local_counts, meta

    def pipelined(self, units_NLC, plan: DispatchPlan, experts, chunks: int) -> torch.Tensor:
        """A static plan's dispatch, ``experts`` and combine in ``chunks`` overlapped chunks
        (parallel/overlap.py) -> the rows back in plan order [R, L, C]."""
        from parallel.overlap import pipelined

        if not (self.uniform_units and plan.static_capacity is not None):
            raise ValueError("the pipelined exchange needs a static plan and uniform_units=True")
        return pipelined(units_NLC, plan, experts, self.ep, self.counter, chunks)

    def combine(self, expert_out_ULC: torch.Tensor, meta: AllToAllMeta) -> torch.Tensor:
        """Expert outputs back in plan row order: regroup undone (source-major), then sent back: [R, L, C]."""
        l, c = meta.row_shape
        with self.timer.stage("combine.regroup"):
            out_UD = expert_out_ULC.reshape(-1, l * c)
            source_major = torch.empty_like(out_UD).index_copy(0, meta.order, out_UD)
        with self.timer.stage("combine.send"):
            back = all_to_all_rows(source_major, meta.recv_splits, meta.send_splits, self.ep.group,
                                   self.counter, self.ep.rank, self.ep.ranks)
        return back.reshape(-1, l, c)


def build_dispatcher(ep: "ExpertGroup | ParallelGroups", counter: CommCounter | None = None,
                     timer: StageTimer | None = None, uniform_units: bool = True):
    """The dispatcher for an expert group (or the groups' ``ep``): all-to-all over it, or local when it
    has one rank. ``timer``: the layer's stage timer, for the all-to-all dispatcher's steps.
    ``uniform_units`` (default: msmoe's trainer, evaluation and benchmarks give every rank the same
    batch): static plans go without the count exchange."""
    if isinstance(ep, ParallelGroups):
        ep = ep.ep
    if ep.size == 1:
        return LocalDispatcher(ep.num_experts)
    return AllToAllDispatcher(ep, counter, timer, uniform_units)

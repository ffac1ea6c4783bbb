"""Topology-aware two-stage transport for HierarchicalMoE: fine-level traffic stays inside a node.

Legend: P ranks in the EP group, n ranks per node (P % n == 0), El experts per rank,
G groups of F_g fine experts (grouped placement: group g = experts offset_g .. offset_g+F_g-1,
offset_g = F_0 + ... + F_{g-1}; every group must sit on one node), Kc coarse and Kf fine slots
per patch, L*C one patch row.

Single-stage dispatch sends a patch once per (group, fine expert) slot, so a patch whose group
lives on another node crosses the node boundary Kf times each way. Here:
  stage 1 (coarse, EP group):  each (patch, coarse slot) row goes once to the *entry rank* of
                               the node holding its group - the rank with the sender's local
                               index there - with its fine expert ids and fine weights;
  stage 2 (fine, node group):  the entry rank dispatches the row to the node's experts by an
                               all-to-all over the node's ranks only, gets their outputs back
                               and sums them with the fine weights;
  stage 1 back:                one row per (patch, coarse slot) returns to the sender, which
                               applies the coarse weight.
The node groups never span two nodes, so fine-level bytes never cross a node boundary; both
stages count bytes (``coarse_counter``, ``fine_counter``, with node crossings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from moe.dispatch import plan_dispatch, unpermute
from moe.hierarchical import HierRoute
from moe.router import RoutingDecision
from parallel.all_to_all import CommCounter, all_to_all_rows, exchange
from parallel.dispatcher import AllToAllDispatcher, AllToAllMeta
from parallel.groups import ExpertGroup


def group_nodes(group_sizes: Sequence[int], experts_per_node: int) -> list[list[int]]:
    """The nodes holding each group's experts under grouped placement (nodes of ``experts_per_node``
    consecutive expert ids): one node per group is what the two-stage transport needs."""
    out, offset = [], 0
    for f_g in group_sizes:
        out.append(sorted({(offset + f) // experts_per_node for f in range(f_g)}))
        offset += f_g
    return out


def build_node_groups(ep_group, node_size: int):
    """Every rank calls this in the same order: one process group per node-sized chunk of every
    EP group. Returns this rank's node group. (EP groups are consecutive global ranks.)"""
    world = dist.get_world_size()
    ep_ranks = dist.get_process_group_ranks(ep_group)
    p = len(ep_ranks)
    if p % node_size:
        raise ValueError(f"ep_size={p} is not divisible by node_size={node_size}")
    mine = None
    for start in range(0, world, node_size):
        members = list(range(start, start + node_size))
        g = dist.new_group(members)
        if dist.get_rank() in members:
            mine = g
    return mine


@dataclass(frozen=True)
class GroupMeta:
    """What stage 1's return trip needs."""

    send_splits: list
    recv_splits: list
    slot_of_row: torch.Tensor  # [R] (patch * Kc + coarse slot) of each sent row
    num_slots: int  # N * Kc


@dataclass(frozen=True)
class NodeMeta:
    """What :meth:`NodeTransport.combine` reads back (produced by :meth:`NodeTransport.dispatch`)."""

    coarse: GroupMeta  # stage 1
    fine: AllToAllMeta  # stage 2 (its plan resolved)
    fine_w_RKf: torch.Tensor  # [R1, Kf] fine weights of the rows this entry rank received
    coarse_w_NKc: torch.Tensor  # [N, Kc] coarse weights of this rank's patches

    @property
    def host_counts(self) -> list:
        return self.fine.host_counts


class NodeTransport:
    """A :class:`moe.hierarchical.HierarchicalDispatcher` in two stages (see the module docstring)."""

    placement = "grouped"  # a group's experts contiguous, so one node holds them

    def __init__(self, group_sizes: Sequence[int], ep: ExpertGroup, node_group, node_size: int,
                 coarse_counter: CommCounter | None = None, fine_counter: CommCounter | None = None):
        """``group_sizes``: F_g of every group (``HierarchicalMoEConfig.group_sizes``)."""
        sizes = [int(f) for f in group_sizes]
        e = sum(sizes)
        if ep.num_experts != e:
            raise ValueError(f"the expert group shards {ep.num_experts} experts, but the groups' sizes "
                             f"experts_per_group={sizes} make {e}")
        self.ep, self.node_size = ep, node_size
        per_node = ep.num_local_experts * node_size
        self.num_node_experts = per_node
        self.group_node = []
        for g, nodes in enumerate(group_nodes(sizes, per_node)):
            if len(nodes) != 1:
                offset = sum(sizes[:g])
                raise ValueError(
                    f"group {g}'s {sizes[g]} experts (ids {offset}..{offset + sizes[g] - 1}) span nodes {nodes} "
                    f"(node = {node_size} ranks x {ep.num_local_experts} experts = {per_node}): the two-stage "
                    f"transport needs every group on one node; choose experts_per_group={sizes} so that the "
                    f"groups' cumulative sizes fall on multiples of {per_node}, or use the one-stage dispatch")
            self.group_node.append(nodes[0])
        self.first_node_expert = ep.rank // node_size * per_node
        self.coarse_counter = coarse_counter if coarse_counter is not None else CommCounter(node_size=node_size)
        self.fine_counter = fine_counter if fine_counter is not None else CommCounter(node_size=node_size)
        self.fine = AllToAllDispatcher(ExpertGroup.of(node_group, per_node), self.fine_counter)

    @property
    def num_local_experts(self) -> int:
        return self.ep.num_local_experts

    @property
    def first_expert(self) -> int:
        return self.ep.first_expert

    def dispatch(self, units_NLC: torch.Tensor, route: HierRoute) -> tuple[torch.Tensor, torch.Tensor, NodeMeta]:
        """Stage 1 to the groups' entry ranks, then stage 2 to the node's experts."""
        rows_RLC, fine_ids, fine_w, fine_mask, coarse = self._to_groups(
            units_NLC, route.group_NKc, route.expert_NKcKf, route.fine_w_NKcKf, route.fine_mask_NKcKf)
        fine_decision = RoutingDecision(fine_ids, fine_w * fine_mask, fine_mask, None, None)
        plan = plan_dispatch(fine_decision, self.num_node_experts, None)
        rows_ULC, local_counts, fine = self.fine.dispatch(rows_RLC, plan)
        return rows_ULC, local_counts, NodeMeta(coarse, fine, fine_decision.weights, route.coarse_w_NKc)

    def combine(self, expert_out_ULC: torch.Tensor, meta: NodeMeta) -> torch.Tensor:
        """Stage 2 back and the fine-weighted sum on the entry rank, stage 1 back and the
        coarse-weighted sum on the sender: [N, L, C]."""
        z_RLC = unpermute(self.fine.combine(expert_out_ULC, meta.fine), meta.fine.plan, meta.fine_w_RKf)
        n, kc = meta.coarse_w_NKc.shape
        back = self._from_groups(z_RLC, meta.coarse).view(n, kc, *z_RLC.shape[1:])
        return (back * meta.coarse_w_NKc.to(back.dtype)[..., None, None]).sum(1)

    def _to_groups(self, units_NLC, group_NKc, fine_ids_NKcKf, fine_w_NKcKf, fine_mask_NKcKf):
        """Stage 1: rows, fine ids (node-local), fine weights and masks as received by entry ranks."""
        ep = self.ep
        n, kc = group_NKc.shape
        kf = fine_ids_NKcKf.shape[-1]
        _, l, c = units_NLC.shape
        node_of_group = torch.tensor(self.group_node, device=group_NKc.device)
        dest = node_of_group[group_NKc] * self.node_size + ep.rank % self.node_size  # [N, Kc]
        live = torch.ones_like(dest, dtype=torch.bool)
        plan = plan_dispatch(RoutingDecision(dest, live.float(), live, None, None, all_live=True), ep.size, None)
        counts = plan.counts.to(ep.device)
        recv_counts = exchange(counts, [1] * ep.size, [1] * ep.size, ep.group,
                               "all-to-all of per-rank row counts (node transport, stage 1)", host_reads=True)
        host = torch.cat([counts, recv_counts]).tolist()  # this stage's one host read: both split lists
        send, recv = host[:ep.size], host[ep.size:]
        rows = units_NLC[plan.unit_of_row].reshape(-1, l * c)
        y = all_to_all_rows(rows, send, recv, ep.group, self.coarse_counter, ep.rank, ep.ranks)
        w = all_to_all_rows(fine_w_NKcKf.reshape(n * kc, kf)[plan.slot_of_row], send, recv, ep.group,
                            CommCounter(), ep.rank)  # metadata, not payload
        ids = exchange(fine_ids_NKcKf.reshape(n * kc, kf)[plan.slot_of_row].to(ep.device), send, recv, ep.group)
        mask = exchange(fine_mask_NKcKf.reshape(n * kc, kf)[plan.slot_of_row].to(ep.device, torch.uint8), send, recv,
                        ep.group)
        meta = GroupMeta(send, recv, plan.slot_of_row, n * kc)
        ids = ids.to(units_NLC.device) - self.first_node_expert
        return y.reshape(-1, l, c), ids, w, mask.to(units_NLC.device).bool(), meta

    def _from_groups(self, z_ULC: torch.Tensor, meta: GroupMeta) -> torch.Tensor:
        """Stage 1 back: [N*Kc, L, C], one combined row per (patch, coarse slot) (zeros if none)."""
        _, l, c = z_ULC.shape
        ep = self.ep
        back = all_to_all_rows(z_ULC.reshape(-1, l * c), meta.recv_splits, meta.send_splits, ep.group,
                               self.coarse_counter, ep.rank, ep.ranks)
        out = back.new_zeros(meta.num_slots, l * c).index_copy(0, meta.slot_of_row, back)
        return out.reshape(meta.num_slots, l, c)

"""The run's transport for its hierarchical MoE layers (``train.transport``), decided once at start-up.

  flat        every (group, fine expert) slot goes straight to its expert's rank: the one-stage
              exchange (moe/hierarchical.py ``OneStage`` over parallel/dispatcher.py's dispatcher)
  node_local  two stages (parallel/node_transport.py): a patch crosses to its group's node once per
              coarse slot and the fine all-to-all stays inside that node; needs ``placement: grouped``

Nodes are ``node_size`` consecutive global ranks, ``node_size`` being the launcher's
``LOCAL_WORLD_SIZE`` (parallel/launchenv.py ``node_size``): torchrun, the deepspeed launcher and
mpirun (parallel/dist.py) number ranks node by node. :meth:`Transport.build` checks that on every
rank (one all-gather of each rank's node size and local rank) and builds the node groups; the byte
counter it hands out counts cross-node bytes with the same node size, for either transport.

On 2 nodes x 2 processes (one torchrun agent per node, running ``msmoe train``):
  msmoe train --config configs/hierarchical.yaml train.ep_size=4 train.transport=node_local \\
      'model.hierarchical.experts_per_group=[6,3,3]' model.hierarchical.fine.num_experts=6
12 experts, 3 per rank, 6 per node: group 0 on node 0, groups 1 and 2 on node 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from common.errors import UserError
from moe.config import HierarchicalMoEConfig
from moe.hierarchical import OneStage
from parallel.all_to_all import CommCounter, collective
from parallel.dispatcher import build_dispatcher
from parallel.groups import ExpertGroup, ParallelGroups
from parallel.node_transport import NodeTransport, build_node_groups, group_nodes

TRANSPORTS = ("flat", "node_local")
FIELD = "train.transport"


class TransportError(UserError, ValueError):
    """``train.transport=node_local`` where the run's layout or model cannot use it."""


def node_local_problem(*, ep_size: int, node_size: int, world_size: int,
                       group_sizes: Sequence[int] | None = None) -> str | None:
    """Why node-local transport cannot serve EP groups of ``ep_size`` ranks on nodes of ``node_size``
    (and, when given, hierarchical groups of ``group_sizes`` experts under grouped placement); None
    when it can. Checked before the workers start (training/job.py preflight) and on every rank."""
    fix = f"or set {FIELD}=flat"
    if world_size % node_size:
        return (f"{FIELD}=node_local: the world of {world_size} ranks is not a whole number of nodes of "
                f"{node_size} (LOCAL_WORLD_SIZE): start the same number of processes on every node, {fix}")
    if ep_size % node_size:
        fits = [p for p in range(node_size, world_size + 1, node_size) if world_size % p == 0]
        return (f"{FIELD}=node_local needs every expert-parallel group to be whole nodes, but train.ep_size="
                f"{ep_size} is not a multiple of the node size {node_size} (LOCAL_WORLD_SIZE): choose "
                f"train.ep_size in {fits}, {fix} (an EP group inside one node never crosses nodes)")
    if group_sizes is not None:
        sizes = [int(f) for f in group_sizes]
        if sum(sizes) % ep_size == 0:  # else the sharding check names it
            per_node = sum(sizes) // ep_size * node_size
            for g, nodes in enumerate(group_nodes(sizes, per_node)):
                if len(nodes) != 1:
                    first = sum(sizes[:g])
                    return (f"{FIELD}=node_local needs every hierarchical group on one node, but with "
                            f"model.hierarchical.experts_per_group={sizes} group {g} (experts {first}.."
                            f"{first + sizes[g] - 1}) spans nodes {nodes} (a node holds {node_size} ranks x "
                            f"{per_node // node_size} experts = {per_node}): choose group sizes whose running "
                            f"sums fall on multiples of {per_node} (e.g. one group per node, or several that "
                            f"fill one), {fix}")
    return None


def layout_problem(node_sizes: Sequence[int], local_ranks: Sequence[int]) -> str | None:
    """Why the ranks (``node_sizes[r]``, ``local_ranks[r]``: rank r's LOCAL_WORLD_SIZE and LOCAL_RANK)
    are not nodes of equal size numbered node by node; None when they are."""
    if len(set(node_sizes)) != 1:
        by_size: dict[int, list[int]] = {}
        for r, n in enumerate(node_sizes):
            by_size.setdefault(n, []).append(r)
        return (f"{FIELD}=node_local needs nodes of equal size, but the ranks' LOCAL_WORLD_SIZE differ "
                f"({', '.join(f'{n} on ranks {rs}' for n, rs in by_size.items())}): start the same number "
                f"of processes on every node (torchrun --nproc-per-node), or set {FIELD}=flat")
    n = node_sizes[0]
    wrong = [r for r, lr in enumerate(local_ranks) if r % n != lr]
    if wrong:
        return (f"{FIELD}=node_local needs ranks numbered node by node (rank r on node r // {n}), but rank "
                f"{wrong[0]} has local rank {local_ranks[wrong[0]]}: launch so that consecutive ranks share a "
                f"node (torchrun does; mpirun --map-by slot), or set {FIELD}=flat")
    return None


@dataclass(frozen=True)
class Transport:
    """How this run's hierarchical layers move patches, and where its nodes are.

    node_size   ranks per node; 0 when the ranks are not nodes numbered node by node (a flat run
                then counts no cross-node bytes)
    nodes       nodes in the world (None: unknown, as above)
    node_group  this rank's node group (node_local only)
    """

    kind: str  # "flat" | "node_local"
    node_size: int = 0
    nodes: int | None = None
    node_group: Any = None

    @staticmethod
    def build(kind: str, groups: ParallelGroups, node_size: int, local_rank: int) -> "Transport":
        """Every rank calls this once, after ParallelGroups.build and before the model is sharded: one
        all-gather of (node size, local rank), then (node_local) the node groups, in the same order on
        every rank. Refusals are :class:`TransportError` on every rank alike."""
        if kind not in TRANSPORTS:
            raise TransportError(f"{FIELD}={kind!r} must be one of {list(TRANSPORTS)}")
        world = groups.world_size
        mine = torch.tensor([node_size, local_rank], dtype=torch.long, device=groups.device)
        if world > 1:
            every = [torch.zeros_like(mine) for _ in range(world)]
            collective("all-gather of the node layout (LOCAL_WORLD_SIZE, LOCAL_RANK)", dist.all_gather, every, mine)
            pairs = torch.stack(every).tolist()  # start-up, once
        else:
            pairs = [mine.tolist()]
        layout = layout_problem([p[0] for p in pairs], [p[1] for p in pairs])
        if kind == "flat":
            even = layout is None and world % node_size == 0
            return Transport("flat", node_size, world // node_size) if even else Transport("flat")
        problem = layout or node_local_problem(ep_size=groups.ep_size, node_size=node_size, world_size=world)
        if problem:
            raise TransportError(problem)
        return Transport("node_local", node_size, world // node_size, build_node_groups(groups.ep_group, node_size))

    def counter(self) -> CommCounter:
        """The run's all-to-all byte counter, counting node crossings with this layout's nodes."""
        return CommCounter(node_size=self.node_size)


FLAT = Transport("flat")  # for callers that build no layout (tests, benchmarks of one layer)


def hierarchical_dispatcher(transport: Transport, cfg: HierarchicalMoEConfig, ep: ExpertGroup,
                            counter: CommCounter | None = None, timer=None):
    """The dispatcher of a :class:`moe.HierarchicalMoE` layer of config ``cfg`` whose experts are
    sharded over ``ep``: the one-stage exchange (flat), or the two-stage node transport with stage 1
    over ``ep`` and stage 2 over ``transport.node_group``, both counted by ``counter``."""
    e = cfg.num_experts
    if transport.kind == "flat":
        return OneStage(build_dispatcher(ep, counter, timer), e)
    if cfg.placement != "grouped":
        raise TransportError(f"{FIELD}=node_local needs model.hierarchical.placement='grouped' (got "
                             f"{cfg.placement!r}): set it, or {FIELD}=flat")
    if cfg.fine.choice != "token":
        raise TransportError(f"{FIELD}=node_local needs model.hierarchical.fine.choice='token' (got "
                             f"{cfg.fine.choice!r}: the fine experts pick from the whole batch): set it, or {FIELD}=flat")
    problem = node_local_problem(ep_size=ep.size, node_size=transport.node_size,
                                 world_size=transport.nodes * transport.node_size, group_sizes=cfg.group_sizes)
    if problem:
        raise TransportError(problem)
    return NodeTransport(cfg.group_sizes, ep, transport.node_group, transport.node_size, counter, counter)

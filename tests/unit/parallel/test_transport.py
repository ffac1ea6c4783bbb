"""The run's transport (parallel/transport.py) without processes: what node_local refuses, named, and
the dispatcher each transport gives a hierarchical layer. Its multi-process runs (two torchrun agents):
tests/integration/test_transport.py."""

import dataclasses
import re

import pytest
import torch

from moe import ExpertConfig, HierarchicalMoEConfig, RouterConfig
from moe.dispatch import LocalDispatcher
from moe.hierarchical import OneStage
from parallel.groups import ExpertGroup
from parallel.transport import FLAT, Transport, TransportError, hierarchical_dispatcher, layout_problem, \
    node_local_problem


def _ep(size: int, num_experts: int, rank: int = 0) -> ExpertGroup:
    el = num_experts // size
    return ExpertGroup(group=None, size=size, rank=rank, ranks=tuple(range(size)), num_experts=num_experts,
                       num_local_experts=el, first_expert=rank * el, device=torch.device("cpu"))


def _says(problem: str | None, pattern: str) -> None:
    assert problem is not None and re.search(pattern, problem), problem


def _cfg(sizes=(6, 3, 3), placement="grouped") -> HierarchicalMoEConfig:
    return HierarchicalMoEConfig(dim=8, patch_size=4, num_groups=len(sizes), experts_per_group=sizes,
                                 placement=placement, coarse=RouterConfig(num_experts=len(sizes), top_k=1),
                                 fine=RouterConfig(num_experts=max(sizes), top_k=2),
                                 expert=ExpertConfig(kind="ffn", hidden_dim=16))


def test_node_local_needs_whole_nodes_per_ep_group_and_groups_on_one_node():
    assert node_local_problem(ep_size=4, node_size=2, world_size=4, group_sizes=(6, 3, 3)) is None
    assert node_local_problem(ep_size=4, node_size=2, world_size=8, group_sizes=(4, 4)) is None  # 2 replicas
    assert node_local_problem(ep_size=4, node_size=4, world_size=4) is None  # one node: allowed, crosses nothing
    _says(node_local_problem(ep_size=2, node_size=4, world_size=8),
          r"train.ep_size=2 is not a multiple of the node size 4 .*choose train.ep_size in \[4, 8\], or set "
          r"train.transport=flat")
    _says(node_local_problem(ep_size=4, node_size=4, world_size=6),
          r"world of 6 ranks is not a whole number of nodes of 4")
    # configs/hierarchical.yaml's 3 x 4 experts at EP=4 on nodes of 2: a node holds 6, group 1 is 4..7
    _says(node_local_problem(ep_size=4, node_size=2, world_size=4, group_sizes=(4, 4, 4)),
          r"experts_per_group=\[4, 4, 4\] group 1 \(experts 4..7\) spans nodes \[0, 1\] \(a node holds 2 ranks "
          r"x 3 experts = 6\): choose group sizes whose running sums fall on multiples of 6")


def test_node_local_needs_equal_nodes_numbered_node_by_node():
    assert layout_problem([2, 2, 2, 2], [0, 1, 0, 1]) is None
    assert layout_problem([1], [0]) is None
    _says(layout_problem([2, 2, 1], [0, 1, 0]),
          r"LOCAL_WORLD_SIZE differ \(2 on ranks \[0, 1\], 1 on ranks \[2\]\)")
    # mpirun mapping round-robin over two hosts: rank 1 is on the second host
    _says(layout_problem([2, 2, 2, 2], [0, 0, 1, 1]),
          r"rank 1 has local rank 0: launch so that consecutive ranks share")


def test_each_transport_gives_a_hierarchical_layer_its_dispatcher():
    flat = hierarchical_dispatcher(FLAT, _cfg(), _ep(1, 12))
    assert isinstance(flat, OneStage) and isinstance(flat.dispatcher, LocalDispatcher)
    nodes = Transport("node_local", node_size=2, nodes=2)  # refused before any group is touched
    with pytest.raises(TransportError, match=r"experts_per_group=\[3, 3, 2\] group 1 \(experts 3..5\) spans"):
        hierarchical_dispatcher(nodes, _cfg((3, 3, 2)), _ep(4, 8))
    with pytest.raises(TransportError, match=r"needs model.hierarchical.placement='grouped' \(got 'spread'\)"):
        hierarchical_dispatcher(nodes, _cfg(placement="spread"), _ep(4, 12))
    expert_choice = dataclasses.replace(_cfg(), fine=RouterConfig(num_experts=6, top_k=2, choice="expert"),
                                        capacity_factor=1.0)
    with pytest.raises(TransportError, match=r"needs model.hierarchical.fine.choice='token' \(got 'expert'"):
        hierarchical_dispatcher(nodes, expert_choice, _ep(4, 12))
    with pytest.raises(TransportError, match=r"train.transport='ring' must be one of \['flat', 'node_local'\]"):
        Transport.build("ring", None, 2, 0)

"""The two-stage node transport (parallel/node_transport.py) refuses a layout it cannot serve; its
multi-process runs are in tests/integration/test_node_transport.py."""

import pytest
import torch

from parallel.groups import ExpertGroup
from parallel.node_transport import NodeTransport


def test_a_group_across_two_nodes_is_refused():
    """8 experts on 4 ranks, nodes of 2 ranks = 4 experts: sizes 3,3,2 put group 1 (ids 3..5) on both."""
    ep = ExpertGroup(group=None, size=4, rank=0, ranks=(0, 1, 2, 3), num_experts=8, num_local_experts=2,
                     first_expert=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"group 1's 3 experts \(ids 3..5\) span nodes \[0, 1\].*experts_per_group"):
        NodeTransport((3, 3, 2), ep, None, 2)
    with pytest.raises(ValueError, match=r"experts_per_group=\[3, 3\] make 6"):
        NodeTransport((3, 3), ep, None, 2)

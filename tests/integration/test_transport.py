"""The node-local transport in the training path (train.transport, parallel/transport.py), on 2 "nodes"
of 2 processes: two real torchrun agents on loopback with a c10d rendezvous (LOCAL_WORLD_SIZE=2 each).

  * a sharded model (tests/dist/transport_check.py: EP=4, hierarchical groups 4,2,2, grouped) trains
    the same with node_local as with flat: losses and final weights within the bounds below; fewer
    bytes cross the node boundary; the refusals of this layout are named;
  * `msmoe train` of configs/hierarchical.yaml (tiny) at EP=4, flat and node_local: the same losses,
    summary.json's nodes, world_size, transport and a2a_bytes_per_step.cross_node (node_local < flat).

Bounds (fp32; the two transports sum a patch's K = Kc x Kf expert outputs in another order:
fine-weighted on the group's node first, then coarse-weighted on the sender):
  LOSS_RTOL    relative difference of a step's loss
  WEIGHT_ATOL  largest absolute difference of any final weight (after 4 AdamW steps, lr 1e-2)
"""

import json
import os

import pytest

from parallel.launchenv import torchrun_command
from tests.helpers import ROOT, TINY_DATA, free_port, run_parallel, worker

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def _agents(target: list[str], tag: str) -> list[list[str]]:
    """One torchrun agent per "node" (2 processes each), node 0 hosting the rendezvous."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [torchrun_command(2, target, nnodes=2, node_rank=i, rdzv_endpoint=endpoint, rdzv_id=f"msmoe-{tag}",
                             options=["--rdzv_conf", f"is_host={int(i == 0)}"]) for i in (0, 1)]


def _close(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert abs(x - y) <= LOSS_RTOL * max(1.0, abs(x)), (a, b)


@pytest.mark.slow
def test_node_local_trains_as_flat_with_fewer_cross_node_bytes(tmp_path):
    out = str(tmp_path)
    reports = run_parallel(_agents([worker("transport_check.py"), "--out", out], "transport-check"), out, 4)
    for r in reports:
        flat, local = r["runs"]["flat"], r["runs"]["node_local"]
        assert r["world"] == 4 and r["ep_size"] == 4
        assert flat["nodes"] == local["nodes"] == 2 and flat["node_size"] == local["node_size"] == 2
        assert flat["dispatcher"] == "OneStage" and local["dispatcher"] == "NodeTransport"
        _close(flat["losses"], local["losses"])
        worst = max(r["weight_diff"].values())
        assert worst <= WEIGHT_ATOL, {n: d for n, d in r["weight_diff"].items() if d > WEIGHT_ATOL}
        assert any(n.startswith("experts.") for n in r["weight_names"]) and len(r["weight_names"]) > 4
        # each (patch, coarse slot) crosses once instead of once per fine slot (Kf = 2)
        assert 0 < local["cross_node_world"] < flat["cross_node_world"]
        assert flat["offrank"] > 0
        seen = r["refusals"]
        assert "train.ep_size=1 is not a multiple of the node size 2" in seen["ep_not_whole_nodes"]
        assert "experts_per_group=[3, 3, 2] group 1 (experts 3..5) spans nodes [0, 1]" in seen["group_spans_nodes"]
        assert "placement='grouped' (got 'spread')" in seen["spread"]
        assert all("train.transport=flat" in m for m in seen.values())
    assert reports[0]["runs"]["node_local"]["cross_node"] < reports[0]["runs"]["flat"]["cross_node"]
    world = [reports[0]["runs"][k]["cross_node_world"] for k in ("flat", "node_local")]
    assert world[0] == 2 * world[1], world  # exactly Kf times fewer, summed over the ranks

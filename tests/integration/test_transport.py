"""The node-local transport in the training path (train.transport, parallel/transport.py), on 2 "nodes"
of 2 processes: two real torchrun agents on loopback with a c10d rendezvous (LOCAL_WORLD_SIZE=2 each).

  * a sharded model (tests/dist/transport_check.py: EP=4, hierarchical groups 4,2,2, grouped) trains
    the same with node_local as with flat: losses and final weights within the bounds below; fewer
    bytes cross the node boundary; the refusals of this layout are named;
  * `msmoe train` of configs/hierarchical.yaml (tiny) at EP=4, flat and node_local: the same losses,
    summary.json's nodes, world_size, transport and a2a_bytes_per_step.cross_node (node_local < flat);
  * `msmoe train --nproc 2` refuses a node_local run it cannot serve before any worker starts (exit 2).

Bounds (fp32; the two transports sum a patch's K = Kc x Kf expert outputs in another order:
fine-weighted on the group's node first, then coarse-weighted on the sender):
  LOSS_RTOL    relative difference of a step's loss
  WEIGHT_ATOL  largest absolute difference of any final weight (after 4 AdamW steps, lr 1e-2)
"""

import json
import os

import pytest

from parallel.launchenv import torchrun_command
from tests.helpers import TINY_DATA, free_port, run_agents, run_cli, run_parallel, worker

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


# tiny sizes on configs/hierarchical.yaml; 12 experts in groups 6,3,3: 3 per rank at EP=4, 6 per node,
# so group 0 sits on node 0 and groups 1, 2 on node 1
TINY_HIER = ("model.dim=32", "model.stem_stride=4", "model.depth=2", "model.moe_blocks=[1]",
             "model.patch_moe.expert.hidden_dim=64", "model.hierarchical.experts_per_group=[6,3,3]",
             "model.hierarchical.fine.num_experts=6", "train.ep_size=4", "train.p=8", "train.k=2", "train.steps=4",
             "train.warmup_steps=1", "train.log_every=2", "train.ckpt_every=100", "eval.untrained=false",
             "eval.missing_modalities=false")


@pytest.mark.slow
def test_msmoe_train_on_two_nodes_flat_vs_node_local(tmp_path):
    summaries, reports = {}, {}
    for kind in ("flat", "node_local"):
        name = f"two-nodes-{kind}"
        args = ["-m", "launcher.cli", "train", "--config", "configs/hierarchical.yaml", "--no-progress",
                f"name={name}", f"out_dir={tmp_path}/runs", f"data.path={tmp_path}/data", f"data.synth={TINY_DATA}",
                *TINY_HIER, f"train.transport={kind}"]
        run_agents(_agents(args, name), timeout=300, envs=[{"MSMOE_REPORT_PLOTS": "0"}] * 2)
        run_dir = os.path.join(tmp_path, "runs", name)
        with open(os.path.join(run_dir, "summary.json")) as fh:
            summaries[kind] = json.load(fh)
        with open(os.path.join(run_dir, "report.md")) as fh:
            reports[kind] = fh.read()
    flat, local = summaries["flat"], summaries["node_local"]
    for kind, s in summaries.items():
        assert s["nodes"] == 2 and s["world_size"] == 4 and s["ep_size"] == 4 and s["transport"] == kind
        assert len(s["loss_history"]) == 4
        mb = s["a2a_bytes_per_step"]["cross_node"] / 1e6
        assert f"Transport: {kind} (2 node(s) x 2 rank(s)); cross-node all-to-all payload per step {mb:.3f} MB" \
            in reports[kind]
    _close(flat["loss_history"], local["loss_history"])
    assert 0 < local["a2a_bytes_per_step"]["cross_node"] < flat["a2a_bytes_per_step"]["cross_node"]
    assert flat["expert_load"]["block1"]["whole_run"] == local["expert_load"]["block1"]["whole_run"]


def test_msmoe_train_refuses_node_local_before_the_workers_start(tmp_path):
    """--nproc 2 is one node of 2 ranks: EP=1 keeps every exchange on its rank, not whole nodes."""
    proc = run_cli("train", "--config", "configs/hierarchical.yaml", "--nproc", "2", f"out_dir={tmp_path}/runs",
                   f"data.path={tmp_path}/data", "train.ep_size=1", "train.transport=node_local",
                   env={"LOCAL_WORLD_SIZE": None}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.transport=node_local needs every expert-parallel group to be whole nodes, but train.ep_size=1 " \
           "is not a multiple of the node size 2" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(os.path.join(tmp_path, "runs"))

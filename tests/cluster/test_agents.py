"""One torchrun agent per emulated node (cluster/agents.py), with a small worker
(tests/dist/cluster_probe.py): the agents meet at node 0's address and form one world whose ranks
see their node's interface; killing a node leaves no process of it; an elastic rendezvous restarts
the survivors at the smaller world; leaving the block on an error kills and reaps everything."""

import glob
import json
import os
import time

import pytest

from cluster.agents import Agents, AgentSpec, AgentsFailed, namespace_pids
from tests.helpers import ROOT, cli_env, worker

PROBE = worker("cluster_probe.py")


def _script(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _reports(folder):
    return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(folder, "rank*.json")))]


def _wait_for(predicate, timeout_s, agents, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not seen in {timeout_s}s:\n{agents.log(0)[-2000:]}"
        assert all(c is None for c in agents.poll()), f"an agent ended early {agents.poll()}:\n{agents.log(0)[-2000:]}"
        time.sleep(0.1)


@pytest.mark.slow
def test_agents_form_one_world_across_the_nodes(make_cluster, tmp_path):
    net = make_cluster(3, 100.0)
    out = str(tmp_path / "out")
    with Agents(net, AgentSpec(2, (PROBE, "--out", out)), str(tmp_path / "logs"), env=cli_env(), cwd=ROOT) as agents:
        assert agents.wait(120) == [0, 0, 0]
    reports = _reports(f"{out}/attempt0")
    assert [r["rank"] for r in reports] == list(range(6))
    assert [r["node"] for r in reports] == [0, 0, 1, 1, 2, 2]  # nodes in address order, ranks contiguous per node
    assert {(r["world"], r["local_world_size"], r["master_addr"], r["gloo_ifname"], r["sum"]) for r in reports} == {
        (6, 2, net.addresses[0], "eth0", 21.0)}
    assert all(os.path.getsize(p) > 0 for p in agents.log_paths)


@pytest.mark.slow
def test_killing_a_node_leaves_none_of_its_processes_and_survivors_restart_smaller(make_cluster, tmp_path):
    net = make_cluster(2, 100.0)
    out = str(tmp_path / "out")
    spec = AgentSpec(2, (PROBE, "--out", out, "--hold"), nnodes="1:2", max_restarts=1)
    with Agents(net, spec, str(tmp_path / "logs"), env=cli_env(), cwd=ROOT) as agents:
        _wait_for(lambda: len(glob.glob(f"{out}/attempt0/rank*.json")) == 4, 120, agents, "4 ranks")
        before = namespace_pids(net.namespaces[1])
        assert len(before) >= 3  # the agent and its 2 workers
        killed = agents.kill_node(1)
        assert set(before) <= set(killed) and namespace_pids(net.namespaces[1]) == []
        codes = agents.wait(120)
    assert codes[0] == 0 and codes[1] == -9
    survivors = _reports(f"{out}/attempt1")
    assert [(r["rank"], r["world"], r["node"], r["sum"]) for r in survivors] == [(0, 2, 0, 3.0), (1, 2, 0, 3.0)]


def test_leaving_the_block_kills_and_reaps_every_node(make_cluster, tmp_path):
    net = make_cluster(2, None)
    with pytest.raises(KeyboardInterrupt):
        sleeper = _script(tmp_path, "sleeper.py", "import time\ntime.sleep(600)\n")
        with Agents(net, AgentSpec(1, (sleeper,)), str(tmp_path / "logs"), env=cli_env(), cwd=ROOT) as agents:
            deadline = time.monotonic() + 60
            while not all(len(namespace_pids(ns)) >= 2 for ns in net.namespaces):  # agent + worker
                assert time.monotonic() < deadline
                time.sleep(0.1)
            raise KeyboardInterrupt
    assert all(namespace_pids(ns) == [] for ns in net.namespaces)
    assert all(p.returncode is not None for p in agents.procs)


def test_a_failing_agent_is_named_with_its_log(make_cluster, tmp_path):
    net = make_cluster(2, None)
    spec = AgentSpec(1, (_script(tmp_path, "fails.py", "import os, sys, time\nn = int(os.environ['GROUP_RANK'])\n"
                                 "print('node', n, 'says hello', flush=True)\ntime.sleep(600 * (n == 0))\nsys.exit(3)\n"),))
    with Agents(net, spec, str(tmp_path / "logs"), env=cli_env(), cwd=ROOT) as agents:
        with pytest.raises(AgentsFailed, match=r"(?s)node 0: still running, killed, node 1: 1\b.*node 1 says hello"):
            agents.wait(120, grace_s=1)
    assert all(namespace_pids(ns) == [] for ns in net.namespaces)

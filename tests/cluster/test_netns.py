"""The emulated cluster's network (cluster/netns.py): nodes reach each other over the switch,
the shaped link runs at its rate, teardown leaves nothing behind, stale namespaces of dead runs go.
Traffic is plain TCP between small Python processes started inside the node namespaces (there is
no ping binary)."""

import json
import subprocess
import sys

import pytest

from cluster import netns

PORT = 5555
TIMEOUT = 20

ECHO_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16); print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    c, _ = s.accept(); c.sendall(c.recv(1024)); c.close()
"""
ECHO_CLIENT = """
import socket, sys, time
for addr in sys.argv[3:]:
    for _ in range(100):
        try:
            c = socket.create_connection((addr, int(sys.argv[1])), timeout=5); break
        except OSError:
            time.sleep(0.05)
    msg = f"hello from {sys.argv[2]}".encode(); c.sendall(msg)
    assert c.recv(1024) == msg; c.close(); print("ok", addr, flush=True)
"""
SINK = """
import json, socket, sys, time
s = socket.socket(); s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); t0 = time.perf_counter(); n = 0
while chunk := c.recv(1 << 16):
    n += len(chunk)
print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0}), flush=True)
"""
SOURCE = """
import socket, sys
c = socket.create_connection((sys.argv[2], int(sys.argv[1])), timeout=10)
c.sendall(b"x" * int(sys.argv[3])); c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
"""


def _start(cluster, node, script, *args) -> subprocess.Popen:
    """``script`` under this Python inside ``node``, once it has printed its "ready" line."""
    p = subprocess.Popen(cluster.exec_argv(node, [sys.executable, "-c", script, *map(str, args)]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise AssertionError(f"server in node {node} did not start: {line!r} {p.stderr.read()}")
    return p


def _finish(p: subprocess.Popen) -> str:
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    assert p.returncode == 0, err
    return out


def _transfer_mbit(cluster, nbytes: int = 4 * 1024 * 1024) -> float:
    """Mbit/s of one ``nbytes`` TCP transfer from node 1 to node 0, timed by the receiver."""
    sink = _start(cluster, 0, SINK, PORT)
    source = subprocess.Popen(cluster.exec_argv(1, [sys.executable, "-c", SOURCE, str(PORT), cluster.addresses[0],
                                                    str(nbytes)]), stderr=subprocess.PIPE, text=True)
    report = json.loads(_finish(sink))
    _finish(source)
    assert report["bytes"] == nbytes
    return report["bytes"] * 8 / report["seconds"] / 1e6


@pytest.mark.parametrize("mode", ["auto", "route"])
def test_every_node_reaches_every_other_over_the_switch(make_cluster, mode):
    cluster = make_cluster(3, 100.0, mode=mode)
    assert cluster.mode == ("route" if mode == "route" else "bridge" if netns.bridge_works() else "route")
    servers = [_start(cluster, i, ECHO_SERVER, PORT, cluster.nodes - 1) for i in range(cluster.nodes)]
    clients = [subprocess.Popen(cluster.exec_argv(i, [sys.executable, "-c", ECHO_CLIENT, str(PORT), str(i),
                                                      *[a for j, a in enumerate(cluster.addresses) if j != i]]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(cluster.nodes)]
    for i, c in enumerate(clients):
        assert _finish(c).split("\n")[:-1] == [f"ok {a}" for j, a in enumerate(cluster.addresses) if j != i]
    for s in servers:
        _finish(s)


def test_a_shaped_link_runs_at_its_rate(make_cluster):
    shaped = _transfer_mbit(make_cluster(2, 100.0))
    unshaped = _transfer_mbit(make_cluster(2, None))
    print(f"4 MiB node1 -> node0: {shaped:.1f} Mbit/s at tbf rate 100 Mbit/s, {unshaped:.0f} Mbit/s unshaped")
    assert 80 <= shaped <= 120
    assert unshaped > 3 * shaped


def test_teardown_removes_every_namespace(netns_ready):
    with netns.EmulatedCluster(2, 50.0) as cluster:
        names = cluster.all_namespaces()
        assert set(names) <= set(netns.list_namespaces())
    assert not set(names) & set(netns.list_namespaces())
    with pytest.raises(KeyError):
        with netns.EmulatedCluster(2, None) as cluster:
            names = cluster.all_namespaces()
            raise KeyError("inside the body")
    assert not set(names) & set(netns.list_namespaces())


def test_cleanup_stale_removes_only_dead_runs_namespaces(netns_ready):
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])  # alive, and not this process (whose own names are kept anyway)
    names = {"dead": f"{netns.PREFIX_ROOT}{dead.pid}-0-n0", "live": f"{netns.PREFIX_ROOT}{live.pid}-0-n0",
             "foreign": f"msmoe-other{dead.pid}-n0", "dead_run_of_other_root": f"msmoe-x{dead.pid}-n0"}
    for name in names.values():
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = netns.cleanup_stale()
        left = set(netns.list_namespaces())
        assert names["dead"] in removed and names["dead"] not in left
        assert {names["live"], names["foreign"], names["dead_run_of_other_root"]} <= left
    finally:
        live.kill()
        live.wait()
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

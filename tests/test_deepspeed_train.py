"""DeepSpeed training with expert parallelism: ZeRO stages, clipping and every launcher.

Each run trains the same small PatchMoE model on the same global batches (tests/dist/
ds_train_check.py); runs must agree step by step with the EP=1 run.
"""

import os
import shutil
import subprocess
import sys

import pytest

from distributed import free_port, run_command, run_parallel, run_torchrun, worker

BIN = os.path.dirname(sys.executable)
REL = 1e-5


def _close(a, b, rel=REL):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * max(1.0, abs(y)), f"{a} != {b}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """torchrun, 2 processes, EP=1 (experts replicated), ZeRO 0, no clipping."""
    reports, _ = run_torchrun("ds_train_check.py", 2, ["--ep-size", "1"], str(tmp_path_factory.mktemp("ref")))
    return reports[0]


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_ep2_matches_ep1_with_clipping(tmp_path, zero):
    runs = {}
    for ep in (1, 2):
        args = ["--ep-size", str(ep), "--zero", str(zero), "--clip", "0.5"]
        runs[ep], _ = run_torchrun("ds_train_check.py", 2, args, str(tmp_path / f"ep{ep}"))
    one, two = runs[1][0], runs[2][0]
    assert two["ep_size"] == 2 and one["ep_size"] == 1
    _close(two["losses"], one["losses"])
    _close(two["grad_norms"], one["grad_norms"])
    assert len(one["grad_norms"]) == 5 and max(one["grad_norms"]) > 0.5  # clipping was active
    _close(two["expert_norms"], one["expert_norms"])
    for r in runs[2]:
        assert r["dense_spread"] == 0.0  # replicas of dense weights stay identical
    if zero == 0:  # msmoe's norm, not DeepSpeed's per-rank average, is what EP=1 computes
        _close(one["deepspeed_zero0_norms"], one["grad_norms"])


@pytest.mark.slow
def test_zero_stages_same_curve_without_clipping(tmp_path, reference):
    for zero in (1, 2):
        reports, _ = run_torchrun("ds_train_check.py", 2, ["--ep-size", "2", "--zero", str(zero)],
                                  str(tmp_path / f"z{zero}"))
        _close(reports[0]["losses"], reference["losses"])


@pytest.mark.slow
def test_deepspeed_launcher(tmp_path, reference):
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           worker("ds_train_check.py"), "--ep-size", "2", "--out", str(tmp_path)]
    reports, _ = run_command(cmd, str(tmp_path), 2)
    assert reports[0]["launcher"] == "env"
    _close(reports[0]["losses"], reference["losses"])


@pytest.mark.slow
def test_mpirun(tmp_path, reference):
    cmd = [os.path.join(BIN, "mpirun"), "-np", "2", sys.executable, worker("ds_train_check.py"),
           "--ep-size", "2", "--out", str(tmp_path)]
    reports, _ = run_command(cmd, str(tmp_path), 2)
    assert reports[0]["launcher"] == "mpi"  # ranks came from mpi4py
    _close(reports[0]["losses"], reference["losses"])


@pytest.mark.slow
def test_accelerate_launch(tmp_path, reference):
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--use_deepspeed", "--num_processes", "2",
           "--zero_stage", "0", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           worker("ds_train_check.py"), "--ep-size", "2", "--out", str(tmp_path)]
    reports, _ = run_command(cmd, str(tmp_path), 2)
    _close(reports[0]["losses"], reference["losses"])


def _agent(endpoint, node_rank, out, extra=()):
    return [os.path.join(BIN, "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
            str(node_rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "msmoe-test",
            "--rdzv_conf", f"is_host={int(node_rank == 0)}", *extra,
            worker("ds_train_check.py"), "--ep-size", "2", "--out", out]


@pytest.mark.slow
def test_two_torchrun_nodes_on_loopback(tmp_path, reference):
    endpoint = f"127.0.0.1:{free_port()}"
    reports = run_parallel([_agent(endpoint, 0, str(tmp_path)), _agent(endpoint, 1, str(tmp_path))],
                           str(tmp_path), 2)
    assert reports[0]["world"] == 2 and reports[0]["ep_size"] == 2  # experts split over the nodes
    _close(reports[0]["losses"], reference["losses"])


def _netns_possible() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2"
    probe = subprocess.run(["ip", "netns", "add", "msmoe-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns refused: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "msmoe-probe"])
    return None


@pytest.fixture
def two_namespaces():
    why = _netns_possible()
    if why:
        pytest.skip(f"network namespaces unavailable here: {why}")
    tag = str(os.getpid() % 10000)
    ns, veth = [f"msm{tag}a", f"msm{tag}b"], [f"mv{tag}a", f"mv{tag}b"]
    addrs = ["10.78.0.1", "10.78.0.2"]
    steps = [["ip", "netns", "add", ns[0]], ["ip", "netns", "add", ns[1]],
             ["ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]]]
    for i in (0, 1):
        steps += [["ip", "link", "set", veth[i], "netns", ns[i]],
                  ["ip", "-n", ns[i], "addr", "add", f"{addrs[i]}/24", "dev", veth[i]],
                  ["ip", "-n", ns[i], "link", "set", veth[i], "up"],
                  ["ip", "-n", ns[i], "link", "set", "lo", "up"]]
    try:
        for s in steps:
            subprocess.run(s, check=True, capture_output=True)
        yield ns, veth, addrs
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


@pytest.mark.slow
def test_two_torchrun_nodes_in_network_namespaces(tmp_path, reference, two_namespaces):
    ns, veth, addrs = two_namespaces
    endpoint = f"{addrs[0]}:{free_port()}"
    cmds = [["ip", "netns", "exec", ns[i], *_agent(endpoint, i, str(tmp_path), ["--local_addr", addrs[i]])]
            for i in (0, 1)]
    envs = [{"GLOO_SOCKET_IFNAME": veth[i]} for i in (0, 1)]
    reports = run_parallel(cmds, str(tmp_path), 2, envs=envs)
    _close(reports[0]["losses"], reference["losses"])

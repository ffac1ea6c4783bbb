"""Launchers for real.

msmoe launch / submit: dry-run output against golden files, clear errors, and every launcher
running the same 2-process EP=2 training for real (same loss curve as plain torchrun).

DeepSpeed training with expert parallelism: ZeRO stages, clipping and every launcher. Each run
trains the same small PatchMoE model on the same global batches (tests/dist/ds_train_check.py);
runs must agree step by step with the EP=1 run.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import (GOLDEN, ROOT, TINY_DATA, VENV_BIN, free_port, run_cli, run_command, run_parallel,
                           run_torchrun, worker)

REL = 1e-5


def _msmoe(*args, env=None, check=True):
    return run_cli(*args, env=env, timeout=600, check=check)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "mpirun", "accelerate"])
def test_dry_run_4_nodes_x_8_gpus_matches_golden(launcher):
    out = _msmoe("launch", "--launcher", launcher, "--nnodes", "4", "--nproc-per-node", "8", "--hostfile",
                 "tests/golden/hosts4.txt", "--mpi", "mpich", "--device", "cuda", "--dry-run", "--",
                 "--config", "configs/gpu.yaml").stdout
    assert out == open(os.path.join(GOLDEN, f"launch_4x8_{launcher}.txt")).read()


def test_submit_dry_run_matches_golden_and_the_shipped_example():
    out = _msmoe("submit", "--nodes", "4", "--gpus-per-node", "8", "--time", "04:00:00", "--partition", "gpu",
                 "--dry-run", "--", "--config", "configs/gpu.yaml").stdout
    assert out == open(os.path.join(GOLDEN, "submit_4x8.sbatch")).read()
    assert out == open(os.path.join(ROOT, "configs", "slurm", "gpu_4x8.sbatch")).read()  # users' copy in step
    assert "#SBATCH --signal=USR1@120" in out and "#SBATCH --requeue" in out and "--auto-resume" in out


def test_submit_sweep_is_a_job_array():
    out = _msmoe("submit", "--nodes", "1", "--gpus-per-node", "2", "--time", "1:00:00", "--dry-run",
                 "--sweep", "train.ep_size=1,2", "--sweep", "model.patch_moe.router.num_experts=4,8", "--",
                 "--config", "configs/tiny.yaml").stdout
    assert "#SBATCH --array=0-3" in out
    for point in ("'train.ep_size=1 model.patch_moe.router.num_experts=4'",
                  "'train.ep_size=2 model.patch_moe.router.num_experts=8'"):
        assert point in out
    assert "name=$run_name" in out and "slurm-%A_%a.out" in out


def test_cli_errors(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\nnode-that-does-not-exist.invalid slots=2\n")
    p = _msmoe("launch", "--launcher", "deepspeed", "--nnodes", "2", "--nproc-per-node", "2", "--hostfile",
               str(hosts), "--", "--config", "configs/tiny.yaml", check=False)
    assert p.returncode != 0 and "node-that-does-not-exist.invalid" in p.stderr
    p = _msmoe("launch", "--launcher", "torchrun", "--nproc-per-node", "2", "--", "--config", "configs/tiny.yaml",
               env={"RANK": "0"}, check=False)
    assert p.returncode != 0 and "inside another launcher" in p.stderr
    p = _msmoe("launch", "--launcher", "torchrun", "--nproc-per-node", "2", "--device", "cuda", "--",
               "--config", "configs/tiny.yaml", check=False)
    assert p.returncode == 2 and "--nproc-per-node 2 asks for 2 processes on this node, one per GPU, but 0 CUDA " \
        "device(s) are present: there is no CUDA device to use, or --device cpu" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    env = {"PATH": os.path.dirname(sys.executable)}  # no sbatch here
    p = _msmoe("submit", "--nodes", "1", "--gpus-per-node", "2", "--time", "1:00", "--", "--config",
               "configs/tiny.yaml", f"out_dir={tmp_path}", env=env, check=False)
    assert p.returncode == 2 and "msmoe: error: sbatch is not on PATH" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_every_launcher_trains_the_same(tmp_path):
    curves = {}
    for launcher in ("torchrun", "deepspeed", "mpirun", "accelerate"):
        _msmoe("launch", "--launcher", launcher, "--nproc-per-node", "2", "--master-port", str(free_port()), "--",
               "--config", "configs/tiny.yaml", "--no-progress", f"name={launcher}", f"out_dir={tmp_path}/runs",
               f"data.path={tmp_path}/data", f"data.synth={TINY_DATA}", "train.ep_size=2", "train.steps=4",
               "eval.untrained=false")
        s = json.load(open(f"{tmp_path}/runs/{launcher}/summary.json"))
        assert s["world_size"] == 2 and s["ep_size"] == 2 and s["steps"] == 4
        curves[launcher] = (s["loss_history"], s["launcher"], s["map"])
    ref = curves["torchrun"][0]
    for launcher, (curve, how, _) in curves.items():
        assert all(abs(a - b) <= 1e-5 * max(1, abs(b)) for a, b in zip(curve, ref)), (launcher, curve, ref)
    assert curves["mpirun"][1] == "mpi" and curves["torchrun"][1] == "env"


def test_submit_asks_for_cpus_and_sets_threads_from_the_allocation():
    from launcher.submit import SubmitError, resolve_cpus_per_task

    out = _msmoe("submit", "--nodes", "1", "--gpus-per-node", "2", "--device", "cpu", "--cpus-per-task", "6",
                 "--time", "1:00:00", "--dry-run", "--", "--config", "configs/tiny.yaml").stdout
    assert "#SBATCH --cpus-per-task=6\n" in out and "srun --ntasks-per-node=1 --cpus-per-task=$SLURM_CPUS_PER_TASK" in out
    threads = subprocess.run(  # the script's two thread lines, run by bash as SLURM would
        ["bash", "-c", "\n".join(ln for ln in out.splitlines() if "threads" in ln) + "\necho $OMP_NUM_THREADS"],
        capture_output=True, text=True, env={"PATH": os.environ["PATH"], "SLURM_CPUS_PER_TASK": "6"})
    assert threads.stdout.strip() == "3"  # 6 CPUs over 2 processes
    user = subprocess.run(["bash", "-c", "\n".join(ln for ln in out.splitlines() if "threads" in ln) +
                           "\necho $OMP_NUM_THREADS"], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "SLURM_CPUS_PER_TASK": "1", "OMP_NUM_THREADS": "5"})
    assert user.stdout.strip() == "5"  # the user's own setting wins

    class Sinfo:  # what `sinfo --noheader --format=%c` prints for a partition of 48- and 64-CPU nodes
        def __init__(self, out, code=0):
            self.stdout, self.returncode = out, code

    assert resolve_cpus_per_task("node", "cuda", 8, "gpu", True, run=lambda *a, **k: Sinfo("64\n48+\n")) == 48
    assert resolve_cpus_per_task("node", "cuda", 8, "gpu", True, run=lambda *a, **k: Sinfo("", 1)) == 64
    assert resolve_cpus_per_task("node", "cpu", 2, None, False) == 2
    assert resolve_cpus_per_task("12", "cuda", 8, "gpu", True) == 12
    with pytest.raises(SubmitError, match=r"--cpus-per-task 'zero' must be a number >= 1, or 'node'"):
        resolve_cpus_per_task("zero", "cuda", 8, "gpu", True)


# ---- DeepSpeed training with expert parallelism under every launcher (tests/dist/ds_train_check.py)

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
    cmd = [os.path.join(VENV_BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           worker("ds_train_check.py"), "--ep-size", "2", "--out", str(tmp_path)]
    reports, _ = run_command(cmd, str(tmp_path), 2)
    assert reports[0]["launcher"] == "env"
    _close(reports[0]["losses"], reference["losses"])


@pytest.mark.slow
def test_mpirun(tmp_path, reference):
    cmd = [os.path.join(VENV_BIN, "mpirun"), "-np", "2", sys.executable, worker("ds_train_check.py"),
           "--ep-size", "2", "--out", str(tmp_path)]
    reports, _ = run_command(cmd, str(tmp_path), 2)
    assert reports[0]["launcher"] == "mpi"  # ranks came from mpi4py
    _close(reports[0]["losses"], reference["losses"])


@pytest.mark.slow
def test_accelerate_launch(tmp_path, reference):
    cmd = [os.path.join(VENV_BIN, "accelerate"), "launch", "--use_deepspeed", "--num_processes", "2",
           "--zero_stage", "0", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           worker("ds_train_check.py"), "--ep-size", "2", "--out", str(tmp_path)]
    reports, _ = run_command(cmd, str(tmp_path), 2)
    _close(reports[0]["losses"], reference["losses"])


def _agent(endpoint, node_rank, out, extra=()):
    return [os.path.join(VENV_BIN, "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
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
        pytest.skip(f"network namespaces unavailable here: {why} (run .ci/system-deps as root for iproute2)")
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

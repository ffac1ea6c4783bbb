"""msmoe launch / submit: dry-run output against golden files, clear errors, and every launcher
running the same 2-process EP=2 training for real (same loss curve as plain torchrun)."""

import json
import os
import subprocess
import sys

import pytest

from parallel.devices import DeviceCountError
from launcher.launch import LaunchError, LaunchSpec, build_commands, check_devices, check_environment, \
    check_hosts_reachable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
TINY_DATA = "{num_train_ids: 24, num_test_ids: 8, num_cameras: 3, images_per_camera: 3, height: 64, width: 32}"


def _msmoe(*args, env=None, check=True):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    if check:
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


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


def test_torchrun_lines_per_node_and_errors():
    spec = LaunchSpec("torchrun", nnodes=2, nproc_per_node=4, master_addr="10.0.0.1", master_port=1234)
    cmds = build_commands(spec, ["--config", "x.yaml"])
    assert len(cmds) == 2 and "--node_rank=1" in cmds[1] and "--rdzv_endpoint=10.0.0.1:1234" in cmds[1]
    with pytest.raises(LaunchError, match="give --master-addr"):
        build_commands(LaunchSpec("torchrun", nnodes=2), [])
    with pytest.raises(LaunchError, match="--nnodes 3 but the hostfile names only 2"):
        build_commands(LaunchSpec("deepspeed", nnodes=3, hosts=("a", "b")), [])


def test_clear_errors():
    with pytest.raises(LaunchError, match="do not resolve: no-such-host.invalid"):
        check_hosts_reachable(["localhost", "no-such-host.invalid"])
    with pytest.raises(DeviceCountError, match=r"--nproc-per-node 4 asks for 4 processes .* but 2 CUDA device\(s\) "
                                               r"are present: use --nproc-per-node 2, or --device cpu"):
        check_devices(LaunchSpec("torchrun", nproc_per_node=4, device="cuda"), cuda_count=2)
    check_devices(LaunchSpec("torchrun", nproc_per_node=4, device="cpu"), cuda_count=0)
    with pytest.raises(LaunchError, match="inside another launcher .*RANK=3"):
        check_environment({"RANK": "3", "PATH": "/bin"})


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
    from distributed import free_port

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

"""Helpers to run a worker script under a real launcher and collect its per-rank JSON."""

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


def run_torchrun(script: str, nproc: int, args: list[str], out_dir: str, timeout: int = 400, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *extra, os.path.join(ROOT, "tests", "dist", script), *args, "--out", out_dir]
    return _run(cmd, out_dir, nproc, timeout)


def _run(cmd, out_dir, nproc, timeout, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    files = sorted(glob.glob(os.path.join(out_dir, "rank*.json")))
    assert len(files) == nproc, f"expected {nproc} rank reports, found {files}\n{proc.stderr[-3000:]}"
    return [json.load(open(f)) for f in files], proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(script: str) -> str:
    return os.path.join(ROOT, "tests", "dist", script)


def run_command(cmd, out_dir, nproc, timeout=400, env=None):
    """Run a launcher command line; returns the per-rank reports."""
    return _run(cmd, out_dir, nproc, timeout, env)


def run_parallel(cmds, out_dir, nproc, timeout=400, envs=None):
    """Start several agents at once (multi-node on one machine); all must succeed."""
    envs = envs or [{}] * len(cmds)
    procs = []
    for cmd, env in zip(cmds, envs):
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **env}
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=ROOT, env=full_env))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise AssertionError(f"agent failed ({p.returncode}):\n{out[-5000:]}")
    files = sorted(glob.glob(os.path.join(out_dir, "rank*.json")))
    assert len(files) == nproc, f"expected {nproc} rank reports, found {files}"
    return [json.load(open(f)) for f in files]

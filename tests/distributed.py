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

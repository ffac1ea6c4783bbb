"""What the tests share, in one place: the repository's paths, the tiny synthetic dataset, the
`msmoe` command line (``python -m launcher.cli``, alone or under torchrun) and worker scripts
(tests/dist/) under a real launcher, whose per-rank JSON reports are collected.

Tests import from here (``from tests.helpers import ROOT, run_cli``); tests/conftest.py holds the
autouse fixture."""

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from common import compat
from parallel.launchenv import torchrun_command, with_on_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
DIST = os.path.join(ROOT, "tests", "dist")  # the worker scripts
VENV_BIN = os.path.dirname(sys.executable)
# a synthetic set small enough for a training test: `data.synth={TINY_DATA}`
TINY_DATA = "{num_train_ids: 24, num_test_ids: 8, num_cameras: 3, images_per_camera: 3, height: 64, width: 32}"

# torch._grouped_mm on CPU exists in the pinned torch 2.13, not in every torch msmoe supports
# (the GPU image's 2.11): tests that force impl="grouped_mm" on CPU skip where it is missing.
needs_cpu_grouped_mm = pytest.mark.skipif(
    not compat.grouped_mm_available(torch.device("cpu"), torch.float32),
    reason="torch._grouped_mm does not run on CPU in this torch " + torch.__version__)


# ---- the msmoe command line

def cli_env(env: dict | None = None, threads: str | None = "1") -> dict:
    """This process's environment with ROOT first on PYTHONPATH, OMP_NUM_THREADS=``threads`` (None: as
    inherited) and run reports without their PNG plots (MSMOE_REPORT_PLOTS=0, common/plots.py;
    the tests that read plots pass {"MSMOE_REPORT_PLOTS": "1"}), then ``env`` on top; a value of None
    in ``env`` removes that variable."""
    out = {**with_on_path(ROOT), "MSMOE_REPORT_PLOTS": "0"}
    if threads is not None:
        out["OMP_NUM_THREADS"] = threads
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def cli_command(*args: str, nproc: int = 1, torchrun: tuple | list = ()) -> list[str]:
    """``python -m launcher.cli ARGS``; with nproc > 1 under ``torchrun --standalone`` (plus the
    ``torchrun`` options, e.g. --max-restarts)."""
    if nproc > 1:
        return torchrun_command(nproc, ["-m", "launcher.cli", *args], options=torchrun)
    return [sys.executable, "-m", "launcher.cli", *args]


def run_cli(*args: str, nproc: int = 1, torchrun: tuple | list = (), cwd: str = ROOT, env: dict | None = None,
            threads: str | None = "1", timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``msmoe ARGS`` (see cli_command, cli_env) in ``cwd``; returns the CompletedProcess (text).
    check=True: a non-zero exit raises AssertionError with the command and the ends of its output."""
    cmd = cli_command(*args, nproc=nproc, torchrun=torchrun)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=cli_env(env, threads), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@contextlib.contextmanager
def mounted_tmpfs(path: str, size: str):
    """A real, small filesystem at ``path`` (a tmpfs of ``size``, e.g. "3m") for the tests of a full
    disk; skips the test where mounting is not allowed (no root, a container without the right)."""
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


# ---- worker scripts (tests/dist/) under a real launcher, and their per-rank JSON

def worker(script: str) -> str:
    return os.path.join(DIST, script)


def run_torchrun(script: str, nproc: int, args: list[str], out_dir: str, timeout: int = 400, extra=()):
    cmd = torchrun_command(nproc, [worker(script), *args, "--out", out_dir], options=extra)
    return _run(cmd, out_dir, nproc, timeout)


def _run(cmd, out_dir, nproc, timeout, env=None):
    env = {**with_on_path(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
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


def run_command(cmd, out_dir, nproc, timeout=400, env=None):
    """Run a launcher command line; returns the per-rank reports."""
    return _run(cmd, out_dir, nproc, timeout, env)


def run_parallel(cmds, out_dir, nproc, timeout=400, envs=None):
    """Start several agents at once (multi-node on one machine); all must succeed. Returns the per-rank
    reports."""
    run_agents(cmds, timeout, envs)
    files = sorted(glob.glob(os.path.join(out_dir, "rank*.json")))
    assert len(files) == nproc, f"expected {nproc} rank reports, found {files}"
    return [json.load(open(f)) for f in files]


def run_agents(cmds, timeout=400, envs=None) -> list[str]:
    """Start several agents at once (multi-node on one machine, e.g. torchrun --nnodes 2 with
    ``--node_rank`` 0 and 1); all must succeed. Returns each agent's output (stdout and stderr)."""
    envs = envs or [{}] * len(cmds)
    procs = []
    for cmd, env in zip(cmds, envs):
        full_env = {**with_on_path(ROOT), "OMP_NUM_THREADS": "1", **env}
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
    return outs


# ---- hand-made records

def scale_record(mode, w, ep, e, sps, dispatch=1.0, combine=1.0, fwd_bytes=0.0, calls=0):
    """One point of a scaling sweep as `msmoe scale` writes it to points.jsonl, made by hand."""
    return {"name": f"scale-{mode}-w{w}-ep{ep}-e{e}", "mode": mode, "world_size": w, "ep_size": ep, "num_experts": e,
            "global_batch": 16, "samples_per_s": sps, "patches_per_s_per_rank": 100.0,
            "step_time_ms": {"step": 100.0, "dispatch": dispatch, "combine": combine, "forward": 40.0,
                             "backward": 40.0, "optimizer": 10.0, "route": 1.0, "experts": 5.0, "data": 2.0,
                             "forward_other": 32.0},
            "a2a_bytes_per_step": {"total": 2 * fwd_bytes, "offrank": fwd_bytes, "forward": fwd_bytes,
                                   "backward": fwd_bytes, "calls": calls},
            "peak_mem_mb_per_rank": [100.0] * w, "expert_load_fraction": {"block1": [1 / e] * e},
            "load_imbalance": {"block1": 1.0}, "dropped_fraction": 0.0, "device": "cpu", "backend": "gloo",
            "env": {"torch": "x"}}


ALPHA, BETA = 300e-6, 1 / 0.5e9  # the validation records' network: 300 us per peer, 0.5 GB/s, loopback-like


def scale_point(mode, w, ep, fwd_bytes, a2a_fwd_s=None, step_ms=100.0):
    """A point whose forward all-to-all time follows (ALPHA, BETA) unless ``a2a_fwd_s`` is given."""
    calls = 8  # 4 forward + 4 backward payload all-to-alls
    if ep == 1:
        r = scale_record(mode, w, 1, 4, 50.0, dispatch=0.5, combine=0.5)
    else:
        t = a2a_fwd_s if a2a_fwd_s is not None else 4 * (ALPHA * (ep - 1) + BETA * fwd_bytes / 4 * (ep - 1) / ep)
        r = scale_record(mode, w, ep, 4, 50.0, dispatch=0.5 + 1e3 * t / 2, combine=0.5 + 1e3 * t / 2,
                         fwd_bytes=fwd_bytes, calls=calls)
    r["step_time_ms"]["step"] = step_ms
    return r


def validation_sweep_records(w4_a2a_s):
    """World 1-2 points that follow (ALPHA, BETA) and a world-4 EP=4 point measured at ``w4_a2a_s``."""
    small = [scale_point("strong", 1, 1, 0), scale_point("strong", 2, 1, 0), scale_point("strong", 2, 2, 4e6),
             scale_point("weak", 2, 1, 0), scale_point("weak", 2, 2, 8e6)]
    big = [scale_point("strong", 4, 1, 0, step_ms=120.0), scale_point("strong", 4, 4, 6e6, a2a_fwd_s=w4_a2a_s, step_ms=150.0)]
    return small + big


# ---- an exported model, used the way a user would: one plain process, no DeepSpeed, no process group
EXPORTED_METRICS = """
import json, sys
import numpy as np
import torch.distributed as dist
from reid.data import load_splits
from reid.embed import embed_split
from reid.exported import load_exported
from reid.metrics import cosine_distance, evaluate

model, splits = load_exported(sys.argv[1]), load_splits(sys.argv[2])
(_, q), (_, g) = (embed_split(model.net, splits[s], 32) for s in ("query", "gallery"))
col = lambda s, c: np.asarray(splits[s][c])
m = evaluate(cosine_distance(q, g), col("query", "pid"), col("gallery", "pid"), col("query", "camid"),
             col("gallery", "camid"), max_rank=20)
np.save(sys.argv[3], q)
print(json.dumps({"map": m.map, "cmc": [m.rank(k) for k in range(1, 21)], "deepspeed": "deepspeed" in sys.modules,
                  "distributed": dist.is_initialized()}))
"""


def exported_metrics(model_path: str, data_path: str, query_feats_npy: str) -> dict:
    """mAP / CMC of an exported model on a dataset's query vs gallery, computed in a fresh process
    that never imports DeepSpeed (reported back); the query features are saved to ``query_feats_npy``."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", EXPORTED_METRICS, model_path, data_path, query_feats_npy],
                          capture_output=True, text=True, cwd=ROOT, env=cli_env(None, "1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- a directory that refuses new files

@contextlib.contextmanager
def unwritable(path: str):
    """``path`` (a directory) refuses new files for the duration, root included: chmod 0555, or as root
    (whom permission bits do not stop) ``chattr +i``; skips the test where neither works."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", path], capture_output=True).returncode:
        pytest.skip("root without chattr +i on this filesystem: no way to make a directory unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", path], check=True)

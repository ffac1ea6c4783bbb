"""DeepSpeed's CPU op build killed half-way (what a section's time budget did on the GPU node's
stand-in): the lock it leaves must not make the next init wait forever. Real build, real kill,
real DeepSpeed init (about a minute of compiling on 2 cores)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from parallel.launchenv import with_on_path
from tests.helpers import ROOT

INIT = ("from parallel.dist import init_distributed, shutdown_distributed; w = init_distributed(timeout_s=60); "
        "from deepspeed.comm import comm as dc; print('ready', w.backend, dc.cdb.shm_comm_op is not None); shutdown_distributed()")


@pytest.mark.slow
def test_the_init_after_a_killed_op_build_clears_its_lock_and_goes_on(tmp_path):
    env = {**with_on_path(ROOT), "TORCH_EXTENSIONS_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    build = subprocess.Popen([sys.executable, "-m", "parallel.ds_ops"], cwd=ROOT, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline and build.poll() is None:
        time.sleep(0.05)
    assert lock.exists(), "the build never took its lock"
    time.sleep(2)  # the compiler is running now
    os.killpg(build.pid, signal.SIGKILL)  # the builder and its ninja / c++ children, as a time budget would
    build.wait()
    assert lock.exists() and not (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists()

    out = subprocess.run([sys.executable, "-c", INIT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"removed a stale lock {lock}" in out.stdout
    assert "building DeepSpeed's CPU communication op (once, about a minute)" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "ready gloo True"
    assert not lock.exists()

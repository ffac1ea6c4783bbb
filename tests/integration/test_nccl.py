"""NCCL failure policy (parallel/nccl.py) in real processes: init_distributed sets nothing for gloo,
and a collective the host reads at once fails named at the wait timeout (exercised on gloo)."""

import os
import subprocess
import sys

import pytest

from parallel.launchenv import with_on_path
from tests.helpers import ROOT, run_torchrun


def test_init_distributed_sets_nothing_for_gloo():
    code = ("import os; from parallel.dist import init_distributed; w = init_distributed(timeout_s=7); "
            "from parallel import all_to_all; "
            "print(w.backend, all_to_all._host_wait_s, os.environ.get('TORCH_NCCL_ASYNC_ERROR_HANDLING'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH_NCCL", "NCCL_", "RANK", "WORLD"))}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=with_on_path(ROOT, env), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "gloo None None"


@pytest.mark.slow
def test_a_host_read_collective_fails_named_in_the_callers_thread_at_the_wait_timeout(tmp_path):
    reports, _ = run_torchrun("host_wait_check.py", 2, ["--wait-s", "3"], str(tmp_path), timeout=200)
    r0 = next(r for r in reports if r["rank"] == 0)
    assert r0["error"] and r0["error"].startswith(
        "collective 'all-to-all of test counts' failed on rank 0: another rank died or stopped calling it"), r0
    assert 2.5 <= r0["waited_s"] <= 20, r0  # the 3 s wait, not the group's 120 s

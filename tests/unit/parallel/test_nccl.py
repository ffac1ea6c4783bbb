"""NCCL failure policy (parallel/nccl.py): the environment and timeouts set before the process group,
and the named, timed wait of the collectives the host reads at once. What only a GPU can show (NCCL's
watchdog, a peer dying under NCCL) is not tested here; the named wait is exercised on gloo."""

import os

import pytest

from parallel.nccl import NCCL_ENV_DEFAULTS, apply_nccl_env, group_timeout_s, watchdog_grace_s
from parallel.launchenv import with_on_path
from tests.helpers import ROOT, run_torchrun


def test_defaults_are_set_only_where_the_user_set_nothing():
    env = {"PATH": "/bin"}
    added = apply_nccl_env(env)
    assert added == NCCL_ENV_DEFAULTS and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert env["TORCH_NCCL_BLOCKING_WAIT"] == "0"

    mine = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_BLOCKING_WAIT": "1"}  # new and old names
    assert apply_nccl_env(mine) == {}
    assert mine == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_BLOCKING_WAIT": "1"}


def test_the_watchdog_fires_after_the_named_wait_on_nccl_only():
    assert group_timeout_s("gloo", 300) == 300 and group_timeout_s("gloo", 8) == 8
    assert group_timeout_s("nccl", 300) == 330 and group_timeout_s("nccl", 8) == 18
    assert watchdog_grace_s(5) == 10 and watchdog_grace_s(1000) == 100


def test_init_distributed_sets_nothing_for_gloo():
    import subprocess
    import sys

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

"""The stale-lock check of DeepSpeed's op build (parallel/ds_ops.py) against a real holder process:
a lock a live process holds is left alone; once its holder is killed the next check removes it."""

import signal
import subprocess
import sys

from parallel.ds_ops import clear_stale_lock, lock_holders


HOLD = "import os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); time.sleep(600)"


def test_a_held_lock_is_kept_and_a_killed_holders_lock_is_removed(tmp_path):
    lock = tmp_path / "lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # torch's FileBaton: O_EXCL create, fd kept open
        assert lock_holders(str(lock)) == [holder.pid]
        said = []
        assert not clear_stale_lock(str(tmp_path), said.append) and lock.exists() and said == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock.exists() and lock_holders(str(lock)) == []  # what a killed build leaves behind
    said = []
    assert clear_stale_lock(str(tmp_path), said.append, settle_s=0.05)
    assert not lock.exists()
    assert len(said) == 1 and "stale lock" in said[0] and str(lock) in said[0] and "killed" in said[0]
    assert not clear_stale_lock(str(tmp_path), said.append, settle_s=0.05) and len(said) == 1  # nothing there: nothing said

"""The stale-lock check of DeepSpeed's op build (parallel/ds_ops.py): a lock a live process holds
is left alone; once its holder is killed the next check removes it."""

import os
import signal
import subprocess
import sys

from parallel.ds_ops import clear_stale_lock, extensions_root, lock_holders

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


def test_the_build_goes_to_the_checkout_unless_the_user_says_where(tmp_path):
    import torch

    mine = extensions_root({})
    assert mine.startswith(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))), "build", "torch_extensions"))
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in mine and torch.__version__.split("+")[0] in mine
    assert extensions_root({"TORCH_EXTENSIONS_DIR": str(tmp_path)}) == str(tmp_path)


def test_a_lock_released_while_it_is_judged_is_left_to_its_owner(tmp_path):
    """torch releases by close() then remove(): in between the lock has no holder but is not stale."""
    import threading

    lock = tmp_path / "lock"
    for replace in (False, True):
        lock.write_text("")
        def release():
            lock.unlink()
            if replace:  # released and taken again by the next loader: another file
                lock.write_text("")
        timer = threading.Timer(0.05, release)
        timer.start()
        said = []
        assert not clear_stale_lock(str(tmp_path), said.append, settle_s=0.3) and said == []
        timer.join()
        assert lock.exists() == replace

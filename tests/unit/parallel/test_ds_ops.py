"""The op build's folder and its stale-lock check (parallel/ds_ops.py) without other processes: a lock
released while it is judged is left to its owner. A live or killed holder process:
tests/integration/test_ds_ops.py."""

import os
import sys

from parallel.ds_ops import clear_stale_lock, extensions_root


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

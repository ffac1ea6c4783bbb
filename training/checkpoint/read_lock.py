"""Read locks on checkpoint steps, which pruning respects.

A reader of a step (``msmoe export``, ``eval``, ``convert``, ``--init-from``) holds a shared flock on
``<ckpt_dir>/.read-<tag>.lock`` while it reads; pruning (training/checkpoint/store.py) deletes a step only
when it gets the exclusive lock at once, and otherwise leaves it for the next prune. The kernel drops
a dead reader's lock. A reader checks after locking that the step is still there (a prune may have
deleted it just before), and picks another one if not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from typing import Iterator


def lock_path(ckpt_dir: str, tag: str) -> str:
    return os.path.join(ckpt_dir, f".read-{tag}.lock")


@contextlib.contextmanager
def shared(ckpt_dir: str, tag: str) -> Iterator[None]:
    """Hold the shared read lock of ``tag`` (waits while a prune deletes it)."""
    try:
        fh = open(lock_path(ckpt_dir, tag), "a")
    except OSError:  # a read-only checkpoint directory: nobody prunes it either
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def delete_unless_read(ckpt_dir: str, tag: str) -> bool:
    """Delete ``ckpt_dir/tag`` unless a reader holds it; True when deleted."""
    path = lock_path(ckpt_dir, tag)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
        with contextlib.suppress(OSError):
            os.remove(path)
        fcntl.flock(fh, fcntl.LOCK_UN)
    return True

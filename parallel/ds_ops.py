"""DeepSpeed's CPU communication op (``deepspeed_shm_comm``): built once, never waited on forever.

On a CPU process group DeepSpeed's comm layer JIT-builds a C++ op at its first init (about a
minute on 2 cores) through torch.utils.cpp_extension, which guards the build with a lock file
(``<extensions dir>/deepspeed_shm_comm/lock``) that the builder holds open and removes when done.
A builder killed mid-build (a time budget, Ctrl-C, OOM) leaves the file behind, and every later
init waits on it forever. ``prepare_shm_op`` runs before DeepSpeed's init and

  * puts the build in a folder of the checkout (``build/torch_extensions/py311_torch2.13.0``),
    unless ``TORCH_EXTENSIONS_DIR`` says where;
  * builds the op there with one line saying so (``make setup`` does this ahead, so training,
    tests and the GPU check's timed sections only load it);
  * clears a lock file that no live process holds open (checked in /proc), saying so.

msmoe processes on one machine serialise the check-clear-build through an flock of their own
(released by the kernel if the holder dies), so a live builder's lock is never taken for stale.
``python -m parallel.ds_ops`` builds it (what ``make setup`` runs).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from typing import Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP = "deepspeed_shm_comm"


def extensions_root(environ: dict | None = None) -> str:
    """Where torch builds JIT extensions for this process: TORCH_EXTENSIONS_DIR, or a folder of the
    checkout per Python and torch version (two interpreters never share a build)."""
    import torch

    env = os.environ if environ is None else environ
    if env.get("TORCH_EXTENSIONS_DIR"):
        return env["TORCH_EXTENSIONS_DIR"]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    return os.path.join(ROOT, "build", "torch_extensions", tag)


def lock_holders(path: str) -> list[int]:
    """PIDs of the processes that hold ``path`` open (torch's lock holder keeps its fd until it
    removes the file); empty when none does."""
    target = os.path.realpath(path)
    pids = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) == target:
                    pids.append(int(pid))
                    break
            except OSError:
                continue
    return pids


def _identity(path: str) -> tuple[int, int, float] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime


def clear_stale_lock(op_dir: str, log: Callable[[str], None] = print, settle_s: float = 1.0) -> bool:
    """Remove ``op_dir/lock`` when no live process holds it; True when one was removed.

    Every DeepSpeed load takes the lock for a moment, and torch releases it by closing the file
    *then* removing it: a lock seen without a holder is only stale if it is still there, the same
    file, ``settle_s`` later (removing it in that instant would make the releasing process fail)."""
    lock = os.path.join(op_dir, "lock")
    first = _identity(lock)
    if first is None or lock_holders(lock):
        return False
    time.sleep(settle_s)
    if _identity(lock) != first or lock_holders(lock):
        return False  # released (or taken again) meanwhile: a live loader's
    age = time.time() - first[2]
    with contextlib.suppress(FileNotFoundError):
        os.remove(lock)
    log(f"msmoe: removed a stale lock {lock} ({age:.0f} s old, no process holds it: left by a killed "
        "DeepSpeed op build); going on instead of waiting on it")
    return True


@contextlib.contextmanager
def _machine_lock(path: str) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _shm_builder():
    """DeepSpeed's own decision (deepspeed/comm/torch.py build_shm_op): the builder, or None where
    this process's accelerator does not use the op (CUDA)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def prepare_shm_op(log: Callable[[str], None] = print) -> str | None:
    """Make sure DeepSpeed's next init loads the op without waiting: the op's build folder, or None
    where DeepSpeed does not use it here."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_root())
    builder = _shm_builder()
    if builder is None:
        return None
    root = os.environ["TORCH_EXTENSIONS_DIR"]
    op_dir = os.path.join(root, OP)
    built = os.path.join(op_dir, f"{OP}.so")
    if os.path.exists(built) and not os.path.exists(os.path.join(op_dir, "lock")):
        return op_dir  # the common case: built, nobody building
    os.makedirs(op_dir, exist_ok=True)
    with _machine_lock(os.path.join(root, f".{OP}.msmoe-lock")):
        clear_stale_lock(op_dir, log)
        fresh = not os.path.exists(built)
        if fresh:
            log(f"msmoe: building DeepSpeed's CPU communication op (once, about a minute) in {op_dir}")
        start = time.time()
        builder.load(verbose=False)
        if fresh:
            log(f"msmoe: DeepSpeed's CPU communication op built in {time.time() - start:.0f} s")
    return op_dir


def main() -> int:
    op_dir = prepare_shm_op()
    print(f"DeepSpeed's CPU communication op: {op_dir or 'not used by this accelerator'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

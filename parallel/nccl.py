"""NCCL failure handling: a dead or stalled peer ends every rank, naming the collective, exit code 2.

How torch reports a stuck NCCL collective (torch 2.11-2.13, ProcessGroupNCCL):
  - collectives return at once; the GPU runs them. A watchdog thread per process group checks them
    and, after the group's timeout, with TORCH_NCCL_ASYNC_ERROR_HANDLING=3 (torch's default) or 1,
    takes the process down from that thread: nothing in Python can name the collective or choose
    the exit code, and a rank blocked on the host (reading split sizes) stays blocked until then.
  - TORCH_NCCL_BLOCKING_WAIT=1 makes every ``wait()`` block the host until the collective is done
    and raise in the caller at the timeout, but it switches the asynchronous handling off and adds a
    host sync to every collective, the gradient all-reduces included: not on the hot path.
  - ``work.wait(timeout)`` on one collective blocks and raises in the caller at that timeout.

What msmoe does on NCCL:
  1. asynchronous error handling stays on (the defaults below, set before the process group exists;
     a user's own setting wins), so no collective can hang a rank for ever;
  2. the collectives whose result the host reads at once anyway (the per-expert split sizes of each
     all-to-all, the capacity all-reduce) are waited for with ``collective_timeout_s`` in the calling
     thread (``parallel.all_to_all.collective(..., host_reads=True)``): a missing peer raises
     ``CollectiveError`` ("collective '<name>' failed on rank R: ...") there, and ``msmoe`` exits 2;
  3. the watchdog's own timeout is ``collective_timeout_s`` plus a grace period, so the named error
     comes first whenever a rank waits on split sizes (every dispatching layer, every step), and the
     watchdog only ends ranks stuck elsewhere (then with torch's own message).
gloo (CPU) needs none of this: its collectives raise in the caller at the timeout.
"""

from __future__ import annotations

import os
from typing import MutableMapping

# set in the worker's environment before the process group is created, unless already set
NCCL_ENV_DEFAULTS = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",  # a failed/timed-out collective takes the process down (no hang)
    "TORCH_NCCL_BLOCKING_WAIT": "0",  # 1 would turn (1) off and put a host sync on every collective
}


def watchdog_grace_s(timeout_s: float) -> float:
    """How much later than the named wait the watchdog fires: 10% of the timeout, at least 10 s."""
    return max(10.0, 0.1 * timeout_s)


def group_timeout_s(backend: str, timeout_s: float) -> float:
    """The timeout to give a process group of ``backend`` for ``train.collective_timeout_s``."""
    return timeout_s + watchdog_grace_s(timeout_s) if backend == "nccl" else timeout_s


def apply_nccl_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the NCCL defaults that are not set yet; returns what was set. Call before the process group."""
    env = os.environ if environ is None else environ
    added = {k: v for k, v in NCCL_ENV_DEFAULTS.items() if k not in env and not _legacy_set(env, k)}
    env.update(added)
    return added


def _legacy_set(env, key: str) -> bool:
    """torch still reads the old names (NCCL_ASYNC_ERROR_HANDLING, NCCL_BLOCKING_WAIT): a user's old
    setting counts as set."""
    return key.replace("TORCH_", "", 1) in env


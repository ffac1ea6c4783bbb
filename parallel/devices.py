"""One process per GPU: how many processes a node can run, checked before any worker starts.

Shared by ``msmoe launch`` (``--nproc-per-node``), ``msmoe train --nproc`` and the start-up of every
worker (``LOCAL_WORLD_SIZE`` under torchrun, mpirun, ...), so that asking for more processes than
GPUs stops with the counts and the fix instead of "invalid device ordinal" inside a worker.
"""

from __future__ import annotations

from typing import Callable

from common.errors import UserError


class DeviceCountError(UserError, ValueError):
    """More processes on a node than CUDA devices; the message names both counts and the fix."""


def cuda_device_count() -> int:
    """CUDA devices this process can see (after CUDA_VISIBLE_DEVICES); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpu_count(nproc: int, option: str, cpu_fix: str, count: int | Callable[[], int] = cuda_device_count) -> int:
    """Refuse ``nproc`` processes per node when fewer CUDA devices are present; returns the count.

    ``option``: how the user asked for ``nproc`` (``--nproc``, ``--nproc-per-node``, ...), used in the
    message; ``cpu_fix``: how to run on the CPU instead, for that command. ``count``: the number of
    devices, or a function returning it (the default asks torch).
    """
    found = count() if callable(count) else count
    if nproc > found:
        fix = f"use {option} {found}" if found >= 1 else "there is no CUDA device to use"
        raise DeviceCountError(
            f"{option} {nproc} asks for {nproc} processes on this node, one per GPU, but {found} CUDA device(s) "
            f"are present: {fix}, or {cpu_fix}")
    return found

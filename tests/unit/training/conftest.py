"""Fixtures of the training unit tests."""

from __future__ import annotations

import os
import signal

import pytest
import torch.distributed as dist

from tests.helpers import free_port

WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def world1():
    """Joins a one-rank gloo group for the module's tests; left again (environment, signal
    handlers, process group) after them, so the tests that follow see none of it."""
    from parallel.dist import init_distributed

    saved_env = {k: os.environ.get(k) for k in WORLD_ENV}
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        yield init_distributed(backend="gloo", timeout_s=60)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

"""Fixtures of the training unit tests."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.helpers import free_port

WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def world1_env(mp: pytest.MonkeyPatch) -> None:
    """The environment of a one-rank run (set through ``mp``: undone after)."""
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        mp.setenv(k, v)
    mp.setenv("MASTER_PORT", str(free_port()))


@pytest.fixture(scope="package")
def world1():
    """A one-rank gloo group in this process, joined once for the tests of this package (the
    expert groups DeepSpeed caches outlive a destroyed group, so it is not joined twice) and left
    after them; the environment it was joined with is undone right away (the ``world`` fixture
    sets it for a test)."""
    from parallel.dist import init_distributed

    with pytest.MonkeyPatch.context() as mp:
        world1_env(mp)
        world = init_distributed(backend="gloo", timeout_s=60)
    yield world
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture()
def world(world1, monkeypatch):
    """``world1`` with its environment set for the test (DeepSpeed's engine reads LOCAL_RANK)."""
    world1_env(monkeypatch)
    return world1

"""The suite's conftest (tests/cluster/conftest.py adds only the emulated cluster's fixture). Shared
constants and runners live in tests/helpers.py (imported here too, so either name works); the tree:
unit/<package>/test_<module>.py mirrors the source, integration/ runs whole commands, launchers and
multi-process jobs, cluster/ builds emulated multi-node networks, dist/ holds the worker scripts."""

import pytest
import torch

from tests.helpers import (
    GOLDEN, ROOT, TINY_DATA, cli_command, cli_env, free_port, needs_cpu_grouped_mm, run_cli, run_command,
    run_parallel, run_torchrun, worker,
)

__all__ = ["GOLDEN", "ROOT", "TINY_DATA", "cli_command", "cli_env", "free_port", "needs_cpu_grouped_mm", "run_cli",
           "run_command", "run_parallel", "run_torchrun", "worker"]  # re-exported: one place for what tests share


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def netns_ready():
    """The emulated cluster's network (cluster/netns.py) for tests/cluster and tests/cluster_scale:
    skips with the reason where namespaces cannot be made here (not root, no iproute2, refused),
    after removing the namespaces a killed earlier run left."""
    from cluster import netns

    why = netns.available()
    if why:
        pytest.skip(f"emulated cluster unavailable here: {why}")
    netns.cleanup_stale()
    return netns

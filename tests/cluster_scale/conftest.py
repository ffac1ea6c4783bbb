"""The scaling sweep on an emulated cluster (msmoe scale --cluster): skips with the reason where
network namespaces cannot be made here, the same check as tests/cluster/ (cluster/netns.py
``available``), and removes the namespaces a killed earlier run left."""

import pytest

from cluster import netns


@pytest.fixture(scope="session")
def netns_ready():
    why = netns.available()
    if why:
        pytest.skip(f"emulated cluster unavailable here: {why}")
    netns.cleanup_stale()
    return netns

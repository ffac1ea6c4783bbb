"""The emulated cluster's fixture (cluster/netns.py): on top of ``netns_ready`` (tests/conftest.py:
skips where namespaces cannot be made, removes a killed earlier run's), closes every cluster a test
made even when the test fails."""

import pytest

from cluster import netns


@pytest.fixture
def make_cluster(netns_ready):
    """``make_cluster(nodes, rate_mbit, **kw)``: a built :class:`netns.EmulatedCluster`, torn down after the test."""
    made = []

    def make(nodes: int, rate_mbit: float | None, **kw) -> netns.EmulatedCluster:
        cluster = netns.EmulatedCluster(nodes, rate_mbit, **kw)
        made.append(cluster)
        return cluster.__enter__()

    yield make
    for cluster in made:
        cluster.close()


@pytest.fixture(scope="session")
def cluster_data(netns_ready, tmp_path_factory):
    """The tiny synthetic set (tests/helpers.py TINY_DATA), made once here: every run of the session
    reads it, no node makes it."""
    from tests.helpers import run_cli

    path = str(tmp_path_factory.mktemp("cluster-data") / "synth")
    run_cli("data", "synth", "--config", "configs/tiny.yaml", "--out", path, check=True)
    return path

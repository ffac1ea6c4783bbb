"""Which launcher started this process (parallel/dist.py), from the environment."""

import pytest

from parallel.dist import discover_launcher


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "env"),
    ({"OMPI_COMM_WORLD_RANK": "1"}, "mpi"),
    ({"PMI_RANK": "0"}, "mpi"),
    ({}, "single"),
])
def test_launcher_discovery(env, expected):
    assert discover_launcher(env) == expected

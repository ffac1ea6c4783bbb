"""Launcher detection and the torchrun command line (parallel/launchenv.py), written once."""

import os
import sys

import pytest

from parallel.launchenv import discover_launcher, launcher_vars, node_size, torchrun_command, with_on_path


def test_standalone_and_rendezvous_command_lines():
    assert torchrun_command(2, ["-m", "launcher.cli", "train"]) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "launcher.cli", "train"]
    assert torchrun_command(8, ["w.py", "--x"], python="python", nnodes=4, node_rank=1, rdzv_endpoint="n0:29500",
                            rdzv_id="job", options=["--max-restarts=1"]) == [
        "python", "-m", "torch.distributed.run", "--nnodes=4", "--nproc_per_node=8", "--node_rank=1",
        "--rdzv_backend=c10d", "--rdzv_endpoint=n0:29500", "--rdzv_id=job", "--max-restarts=1", "w.py", "--x"]


def test_launcher_variables():
    assert discover_launcher({}) == "single" and launcher_vars({}) == []
    assert discover_launcher({"RANK": "0", "WORLD_SIZE": "2"}) == "env"
    assert discover_launcher({"PMI_RANK": "1"}) == "mpi"
    assert launcher_vars({"PATH": "/bin", "LOCAL_RANK": "0", "OMPI_COMM_WORLD_RANK": "0"}) == \
        ["LOCAL_RANK", "OMPI_COMM_WORLD_RANK"]


def test_with_on_path_puts_the_folder_first_and_keeps_the_callers_entries():
    env = with_on_path("/proj", {"PYTHONPATH": f"/tmp/msmoe-site{os.pathsep}{os.pathsep}/proj", "X": "1"})
    assert env == {"PYTHONPATH": f"/proj{os.pathsep}/tmp/msmoe-site", "X": "1"}
    assert with_on_path("/proj", {})["PYTHONPATH"] == "/proj"


def test_node_size_is_the_launchers_local_world_size_else_one_node():
    assert node_size(4, {"LOCAL_WORLD_SIZE": "2"}) == 2
    assert node_size(1, {}) == 1 and node_size(4, {"LOCAL_WORLD_SIZE": " "}) == 4
    with pytest.raises(ValueError, match=r"LOCAL_WORLD_SIZE='two' \(set by the launcher\) must be a whole number"):
        node_size(4, {"LOCAL_WORLD_SIZE": "two"})

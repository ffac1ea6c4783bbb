"""Room to write a run (training/room.py), on real directories: writable or not (an unwritable one
is made with chmod, or chattr +i as root, whom permission bits do not stop), free space against a need."""

import os
import re
import shutil

import pytest

from tests.helpers import unwritable
from training import room
from training.checkpoint.save_guard import CheckpointWriteError


def test_write_problem_names_what_stops_a_write_and_leaves_nothing_behind(tmp_path):
    ok = tmp_path / "ok"
    ok.mkdir()
    assert room.write_problem(str(ok)) is None and os.listdir(ok) == []  # the probe file is gone
    assert room.write_problem(str(tmp_path / "new" / "deeper")) is None
    assert not (tmp_path / "new").exists()  # a missing directory is judged by its parent, not created
    (tmp_path / "file").write_text("x")
    assert room.write_problem(str(tmp_path / "file")) == "is not a directory"
    assert room.write_problem(str(tmp_path / "file" / "ckpt")) == f"cannot be created: {tmp_path}/file is not a directory"
    locked = tmp_path / "locked"
    locked.mkdir()
    with unwritable(str(locked)):
        assert room.write_problem(str(locked)).startswith("is not writable (")
        assert room.write_problem(str(locked / "checkpoints")) == f"cannot be created: its parent {locked} is not writable"
    assert os.listdir(locked) == []


def test_check_writable_names_the_directory_and_the_fix(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    room.check_writable(str(run_dir), str(run_dir / "checkpoints"), str(tmp_path / "runs"))
    with unwritable(str(run_dir / "checkpoints")):
        with pytest.raises(CheckpointWriteError) as err:
            room.check_writable(str(run_dir), str(run_dir / "checkpoints"), str(tmp_path / "runs"))
    text = str(err.value)
    assert text.startswith(f"the checkpoint directory {run_dir}/checkpoints is not writable (")
    assert "make it writable" in text and f"out_dir= (now '{tmp_path}/runs')" in text


def test_room_problem_compares_the_need_with_the_free_bytes_of_the_filesystem(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    assert room.room_problem(str(tmp_path / "runs" / "checkpoints"), 1 << 20, "x", "runs") is None
    text = room.room_problem(str(tmp_path / "runs" / "checkpoints"), free + (1 << 40), "4 parameters", "runs")
    assert text.startswith(f"not enough free disk for one checkpoint in {tmp_path}/runs/checkpoints: about ")
    assert "needed (4 parameters)" in text
    said = float(re.search(r"needed \(4 parameters\), ([0-9.]+) MiB free on its filesystem", text).group(1))
    assert abs(said - free / 2**20) < 1024  # the free bytes of that filesystem (others write meanwhile)


def test_checkpoint_bytes_counts_weights_and_adam_state_as_deepspeed_lays_them_out():
    # the tiny config: 37,063 dense parameters and 4 experts of 4,192 (16,768); see training/room.py
    assert room.checkpoint_bytes(37_063, 16_768, 1, 0, "fp32") == 53_831 * 4 + 53_831 * 8 * 2
    assert room.checkpoint_bytes(37_063, 16_768, 2, 0, "fp32") == 53_831 * 4 + (37_063 + 8_384) * 8 * 3
    assert room.checkpoint_bytes(37_063, 16_768, 2, 1, "bf16") == 53_831 * 2 + 53_831 * 12

"""A finished run's last writes (training/final_writes.py) on a really full disk: the failure names
the file and the cause, leaves no temp or 0-byte file and no COMPLETE, and says how to get the report."""

import os

import pytest

from tests.helpers import mounted_tmpfs
from training import final_writes
from training.faults import FILL_NAME, FaultPlan


def test_a_full_disk_after_the_final_commit_is_named_and_leaves_nothing_half_written(tmp_path):
    with mounted_tmpfs(str(tmp_path / "small"), "1m") as out_dir:
        run_dir = os.path.join(out_dir, "full")
        os.makedirs(os.path.join(run_dir, "checkpoints"))
        FaultPlan.parse("fill_disk@20").fill_disk(20, 0, out_dir)  # the disk fills after the final commit
        with pytest.raises(OSError) as err:
            final_writes.write_outputs(run_dir, {"name": "full", "map": 0.5}, None, 20)
        assert sorted(os.listdir(run_dir)) == ["checkpoints"]  # no summary.json.tmp, no COMPLETE
        command = final_writes.resume_command("configs/tiny.yaml", ("name=full", f"out_dir={out_dir}"), 2)
        with pytest.raises(final_writes.ReportWriteError) as named:
            final_writes.agree(final_writes.failure(err.value, run_dir), 1, 20, run_dir,
                               os.path.join(run_dir, "checkpoints"), command)
        text = str(named.value)
        assert f"({run_dir}/summary.json: No space left on device (0 bytes free on its filesystem))" in text, text
        assert f"checkpoint step0000020 (step 20) is committed and safe in {run_dir}/checkpoints" in text
        assert "not marked COMPLETE" in text
        assert (f"`msmoe train --config configs/tiny.yaml --nproc 2 name=full out_dir={out_dir} --resume`"
                in text), text
        final_writes.agree(None, 1, 20, run_dir, "", command)  # no failure: nothing raised
        os.remove(os.path.join(out_dir, FILL_NAME))

"""The fault plan (training/faults.py): parsed once, which rank and step each fault hits."""

import errno
import os
import shutil

import pytest

from common.config import ConfigError
from tests.helpers import mounted_tmpfs
from training.faults import NO_FAULTS, FaultPlan


def test_default_ranks_and_explicit_ranks():
    plan = FaultPlan.parse("kill@12:1; nan_loss@5; stall@3; kill_in_save@10")
    assert plan.fires("kill", 12, 1) and not plan.fires("kill", 12, 0) and not plan.fires("kill", 11, 1)
    assert plan.fires("nan_loss", 5, 0) and plan.fires("nan_loss", 5, 3)  # every rank by default
    assert plan.fires("stall", 3, 0) and not plan.fires("stall", 3, 1)  # process faults: rank 0 by default
    assert plan.fires("kill_in_save", 10, 0) and not plan.fires("kill", 10, 0)


def test_nothing_without_the_variable_or_after_an_elastic_restart():
    assert FaultPlan.from_env({}) == NO_FAULTS
    assert FaultPlan.from_env({"MSMOE_FAULT": "kill@1"}).fires("kill", 1, 0)
    assert FaultPlan.from_env({"MSMOE_FAULT": "kill@1", "TORCHELASTIC_RESTART_COUNT": "1"}) == NO_FAULTS
    NO_FAULTS.at_step_start(0, 0)  # the null plan does nothing


@pytest.mark.parametrize("spec", ["bogus", "kill@x", "kill@3:r", "explode@3"])
def test_a_malformed_item_is_named(spec):
    with pytest.raises(ConfigError, match=rf"MSMOE_FAULT=.*item '{spec}' must look like kind@step"):
        FaultPlan.parse(spec)


def test_fill_disk_fills_a_small_filesystem_for_real_and_refuses_a_large_one(tmp_path):
    from training.faults import FILL_NAME

    plan = FaultPlan.parse("fill_disk@20")
    assert plan.fires("fill_disk", 20, 0) and not plan.fires("fill_disk", 20, 1)  # rank 0 by default
    with mounted_tmpfs(str(tmp_path / "small"), "1m") as mnt:
        plan.fill_disk(19, 0, mnt)  # another step: nothing
        assert os.listdir(mnt) == []
        plan.fill_disk(20, 0, mnt)
        with pytest.raises(OSError) as err:
            with open(os.path.join(mnt, "summary.json"), "w") as fh:
                fh.write("{}")
        assert err.value.errno == errno.ENOSPC
        os.remove(os.path.join(mnt, FILL_NAME))  # the space comes back
        open(os.path.join(mnt, "summary.json"), "w").write("{}")
    if shutil.disk_usage(str(tmp_path)).total > 256 << 20:  # never a real disk
        with pytest.raises(ConfigError, match=r"fill_disk@20 would fill the filesystem of .* small tmpfs"):
            plan.fill_disk(20, 0, str(tmp_path))
        assert os.listdir(tmp_path) == ["small"]

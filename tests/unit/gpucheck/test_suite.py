"""gpucheck/suite.py without running pytest: the shards name files that exist, and a shard that
exits for another reason than failed tests (a missing file: pytest's usage error) is named."""

import glob
import os

from gpucheck.suite import NO_TESTS, SuiteRun, shard_files
from tests.helpers import ROOT


def test_quick_shards_name_files_that_exist():
    for shard in shard_files(ROOT, quick=True):
        for f in shard:
            assert os.path.isfile(os.path.join(ROOT, f)), f


def test_full_shards_cover_every_test_file_once():
    every = sorted(os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "tests", "**", "test_*.py"),
                                                               recursive=True))
    assert sorted(f for shard in shard_files(ROOT, quick=False) for f in shard) == every


def test_a_shard_that_exits_without_results_is_named(tmp_path):
    run = SuiteRun.__new__(SuiteRun)  # the result of finished shards only: no processes
    run.out, run.budget_s = str(tmp_path), 300.0
    res = run._result([4, NO_TESTS])
    assert not res["passed"] and "shard 0 exited 4 (tests-0.log)" in res["summary"]
    assert "shard 1" not in res["summary"]

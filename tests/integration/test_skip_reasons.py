"""pyproject.toml's ``-rs`` makes pytest print every skip reason in the summary of `make test` (pytest
run on a file whose tests skip like the SLURM ones)."""

import os
import subprocess
import sys

from tests.helpers import ROOT


def test_pytest_summary_prints_each_skip_reason(tmp_path):
    """The repository's pytest options (pyproject.toml) on a file whose tests skip like the SLURM ones."""
    (tmp_path / "test_skipping.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.skipif(True, reason='SLURM tests skipped: sbatch not installed; run .ci/system-deps')\n"
        "def test_a():\n    pass\n"
        "def test_b():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", os.path.join(ROOT, "pyproject.toml"),
                           "--rootdir", str(tmp_path), "-p", "no:cacheprovider", str(tmp_path / "test_skipping.py")],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SKIPPED")]
    assert len(lines) == 2, proc.stdout  # one line per skipped test, each with its reason
    assert all(ln.endswith("SLURM tests skipped: sbatch not installed; run .ci/system-deps") for ln in lines), proc.stdout
    assert "2 skipped" in proc.stdout

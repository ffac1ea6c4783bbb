"""Skipped tests say why in the summary of `make test`, with the command that enables them: the
SLURM tests' reason (tests/slurm.py: available) names what is missing and `.ci/system-deps`, and
pyproject.toml's ``-rs`` makes pytest print every skip reason."""

import os
import subprocess
import sys

from tests import slurm
from tests.helpers import ROOT


def test_slurm_reason_names_the_missing_binaries_and_the_command(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(slurm.shutil, "which", lambda b: None if b in ("slurmd", "munged") else f"/usr/bin/{b}")
    why = slurm.available()
    assert why == ("SLURM tests skipped: slurmd munged not installed; run .ci/system-deps as root to install SLURM "
                   "(slurmctld slurmd slurm-client munge), then rerun")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert ".ci/system-deps" in slurm.available() and "root" in slurm.available()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(slurm.shutil, "which", lambda b: f"/usr/bin/{b}")
    assert slurm.available() is None


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

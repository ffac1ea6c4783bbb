"""Skipped tests say why in the summary of `make test`, with the command that enables them: the
SLURM tests' reason (tests/slurm.py: available) names what is missing and `.ci/system-deps`, and
pyproject.toml's ``-rs`` makes pytest print every skip reason (tests/integration/test_skip_reasons.py)."""

import os

from tests import slurm


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

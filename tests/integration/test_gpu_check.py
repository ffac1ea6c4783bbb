"""make gpu-check on a machine without CUDA, as a command: it refuses cleanly, in one line, and (slow)
the dry run of every section at tiny sizes on CPU (``--allow-cpu --device cpu --quick``).

The check itself runs on a GPU node (README, "First run on a GPU"); the sections' logic in one
process: tests/unit/gpucheck/test_sections.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

from parallel.launchenv import with_on_path
from tests.helpers import ROOT

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: the check would run")


def _run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=with_on_path(ROOT), **kw)


@no_cuda
def test_refuses_without_cuda_in_one_line(tmp_path):
    proc = _run([sys.executable, "-m", "gpucheck.check", "--out", str(tmp_path)])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA device visible" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not os.listdir(tmp_path)  # nothing started


@no_cuda
def test_make_gpu_check_refuses_before_installing(tmp_path):
    proc = _run(["make", "gpu-check", f"GPU_PYTHON={sys.executable}", f"OUT={tmp_path}",
                 f"GPU_SITE={tmp_path / 'site'}"])
    assert proc.returncode != 0
    assert "gpu-check: no CUDA device visible" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "site").exists()


def test_cpu_needs_the_dry_run_flag(tmp_path):
    proc = _run([sys.executable, "-m", "gpucheck.check", "--out", str(tmp_path), "--device", "cpu"])
    assert proc.returncode == 2 and "--allow-cpu" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_dry_run_of_every_section_on_cpu(tmp_path):
    """The whole check at tiny sizes on CPU: every section passes (bf16 training included)."""
    proc = _run([sys.executable, "-m", "gpucheck.check", "--out", str(tmp_path), "--allow-cpu", "--device", "cpu",
                 "--quick"])
    assert "Traceback (most recent call last)" not in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    sections = results["sections"]
    assert set(sections) == {"tests", "layers", "dispatch", "syncs", "train", "bench"}
    for name in ("tests", "layers", "dispatch", "syncs", "train", "bench"):
        assert sections[name]["passed"], (name, sections[name]["summary"])
    md = (tmp_path / "results.md").read_text()
    assert "MoE layers vs the float64 loop reference" in md and "Layer benchmark" in md
    sweep = sections["bench"]["figures"]["experts_sweep"]  # the expert-count sweep ran, one row per E
    assert [r["experts"] for r in sweep["rows"]] == [4, 16] and all(r["patchmoe_x_dense"] > 0 for r in sweep["rows"])
    assert "Expert-count sweep (small shape" in md and "| 16 |" in md
    assert (tmp_path / "gpu-check.log").stat().st_size > 0

"""make gpu-check on a machine without CUDA, and its sections' logic at tiny sizes on CPU.

The check itself runs on a GPU node (README, "First run on a GPU"); here: it refuses cleanly,
and the code of every section runs (``--allow-cpu --device cpu --quick``, the slow ones)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from gpucheck import section
from gpucheck.sections import benchmark as check_bench, dispatch as check_dispatch, layers as check_layers
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


def test_layer_case_against_float64_reference():
    """One case of the layers section, end to end: margins, float64 reference, device run, errors."""
    case = next(c for c in check_layers.cases() if c.name == "PatchMoE ffn bmm")
    sizes = check_layers.Sizes.of(quick=True)
    layer, data, _ = check_layers.prepare(case, sizes, seed=0)
    assert check_layers.routing_margin(case, layer, data["x"], sizes.patch) >= check_layers.MARGIN
    ref = check_layers.reference_grads(case, layer, data)
    for dname, dtype in check_layers.DTYPES.items():
        mine = check_layers.device_grads(case, layer, data, torch.device("cpu"), dtype)
        assert set(mine) == set(ref)
        worst = max(section.relative_error(mine[n], ref[n]) for n in ref)
        assert worst <= check_layers.BOUND[dname], (dname, worst)


def test_relative_error_treats_a_missing_gradient_as_zero():
    assert section.relative_error(None, torch.zeros(3)) == 0.0
    assert section.relative_error(torch.ones(3), None) == float("inf")
    assert section.relative_error(torch.ones(2, 2), torch.ones(4)) == float("inf")
    assert section.relative_error(torch.tensor([1.0, 1.01]), torch.tensor([1.0, 1.0])) == pytest.approx(0.01 / 2 ** 0.5)


def test_dispatch_one_rank_group_on_gloo():
    if torch.distributed.is_initialized():
        pytest.skip("a process group already exists in this process")
    res = check_dispatch.one_rank(torch.device("cpu"))
    assert res["backend"] == "gloo"
    for name, r in res["rounds"].items():
        assert r["max_error"] <= check_dispatch.BOUND, (name, r)
    assert res["rounds"]["empty"]["load"][2:] == [0.0, 0.0]  # nothing routed to the pushed-down experts


def test_bench_goals_from_rows():
    rows = [{"name": "dense FFN (hidden K*F)", "fraction_of_gemm_peak": 0.8, "ratio_to_deepspeed": 0.3},
            {"name": "PatchMoE P=8", "fraction_of_gemm_peak": 0.55, "ratio_to_deepspeed": 0.5},
            {"name": "DeepSpeed MoE (top-2)", "fraction_of_gemm_peak": 0.2, "ratio_to_deepspeed": 1.0}]
    g = check_bench.goals(rows)
    assert g["PatchMoE share of dense GEMM rate"]["met"] is True
    assert g["PatchMoE throughput / DeepSpeed's"]["value"] == pytest.approx(2.0)
    cpu = check_bench.goals([{**r, "fraction_of_gemm_peak": None, "ratio_to_deepspeed": None} for r in rows[:2]])
    assert cpu["PatchMoE share of dense GEMM rate"]["met"] is None
    assert cpu["PatchMoE throughput / DeepSpeed's"]["met"] is None


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


def test_sync_budget_follows_the_config():
    from gpucheck.sections.syncs import sync_budget
    from training.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "h100.yaml"))
    assert sync_budget(cfg) == 1 + len(cfg.model.moe_blocks)  # one per dispatching MoE layer + one per step
    assert len(cfg.model.moe_blocks) == 4

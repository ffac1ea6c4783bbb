import json
import os
import statistics
import subprocess
import sys

import pytest

BIN = os.path.join(os.path.dirname(sys.executable), "msmoe")


def _run(*args, cwd=None):
    return subprocess.run([BIN, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_subcommands():
    out = _run("--help")
    assert out.returncode == 0
    for cmd in ("bench", "fit", "train", "eval", "data"):
        assert cmd in out.stdout
    assert "layer" in _run("bench", "--help").stdout


def test_bench_layer_prints_figures(tmp_path):
    js = tmp_path / "bench.json"
    out = _run("bench", "layer", "--batch", "2", "--height", "16", "--width", "16", "--dim", "16",
               "--hidden", "32", "--experts", "4", "--patch", "4", "--repeats", "2", "--warmup", "1",
               "--json", str(js))
    assert out.returncode == 0, out.stderr
    assert "dense FFN" in out.stdout and "PatchMoE P=4" in out.stdout
    rows = json.loads(js.read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names[0].startswith("dense") and any(n.startswith("PatchMoE") for n in names)
    dense, patch = rows[0], next(r for r in rows if r["name"].startswith("PatchMoE"))
    assert patch["gflop_per_step"] == pytest.approx(dense["gflop_per_step"])  # equal active FLOPs
    assert patch["router_units"] == 2 * 4 * 4 and all(r["ms_median"] > 0 for r in rows)
    token = next(r for r in rows if r["name"].startswith("TokenMoE"))
    assert token["router_units"] == 16 * patch["router_units"]  # routing work and metadata: 1/(P*P)
    assert token["metadata_bytes"] == 16 * patch["metadata_bytes"]
    ds = next(r for r in rows if r["name"].startswith("DeepSpeed"))
    fs = next(r for r in rows if r["name"].startswith("fairscale"))
    assert ds["ratio_to_deepspeed"] == 1.0 and fs["gflop_per_step"] == ds["gflop_per_step"] == dense["gflop_per_step"]
    # ratios are paired: the median over rounds of (this step / the other's step in the same round)
    paired = statistics.median(a / b for a, b in zip(patch["ms_rounds"], ds["ms_rounds"]))
    assert patch["ratio_to_deepspeed"] == pytest.approx(paired) and len(patch["ms_rounds"]) == 2
    assert patch["ratio_to_dense"] == pytest.approx(
        statistics.median(a / b for a, b in zip(patch["ms_rounds"], dense["ms_rounds"])))
    assert all(r["page_faults_per_step"] >= 0 for r in rows)


def test_fit_learns(tmp_path):
    out = _run("fit", "--steps", "60", "--quiet", "--out", str(tmp_path), "--name", "t")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["final_mse"] < 0.7 * summary["initial_mse"]
    assert len(summary["last_routing"]["load"]) == 8


@pytest.mark.slow
def test_bench_ep_bytes_match_the_analytic_minimum(tmp_path):
    js = tmp_path / "ep.json"
    out = _run("bench", "ep", "--nproc", "2", "--ep-sizes", "1,2", "--steps", "2", "--warmup", "1",
               "--size", "8", "--batch", "2", "--dim", "16", "--hidden", "32", "--json", str(js))
    assert out.returncode == 0, out.stderr
    one, two = json.loads(js.read_text())
    assert one["ep_size"] == 1 and one["bytes_per_step_total"] == 0  # local experts: nothing sent
    assert two["bytes_per_step_total"] == two["analytic_min_bytes"] > 0
    assert 0 < two["bytes_per_step_offrank"] < two["bytes_per_step_total"]
    assert all(two["ms"][k] > 0 for k in ("route", "dispatch", "experts", "combine", "backward"))

"""msmoe bench layer (bench/layer.py): the printed figures and the JSON rows."""

import json
import statistics

import pytest

from tests.helpers import run_cli


def test_bench_layer_prints_figures(tmp_path):
    js = tmp_path / "bench.json"
    out = run_cli("bench", "layer", "--batch", "2", "--height", "16", "--width", "16", "--dim", "16",
                  "--hidden", "32", "--experts", "4", "--patch", "4", "--repeats", "2", "--warmup", "1",
                  "--json", str(js), threads=None, timeout=300)
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


def test_experts_sweep_table_and_report_section(tmp_path):
    """--experts-sweep: one row per expert count, each our and DeepSpeed's time over the dense FFN's of the
    same rounds; the JSON feeds the scaling report's section."""
    js = tmp_path / "sweep.json"
    out = run_cli("bench", "layer", "--batch", "1", "--height", "8", "--width", "8", "--dim", "16", "--hidden", "16",
                  "--patch", "4", "--repeats", "2", "--warmup", "1", "--skip", "fairscale", "--experts-sweep", "2,8",
                  "--json", str(js), threads=None, timeout=300)
    assert out.returncode == 0, out.stderr
    sweep = json.loads(js.read_text())["sweep"]
    assert [r["experts"] for r in sweep] == [2, 8]
    for r in sweep:
        assert r["patchmoe_x_dense"] > 0 and r["deepspeed_x_dense"] > 0 and r["patchmoe_faults_per_step"] >= 0
        assert f"| {r['experts']} | {r['patchmoe_x_dense']:.2f} | " in out.stdout
    from scaling.report import write_scale_report
    from tests.helpers import scale_record

    recs = [scale_record("strong", 1, 1, 4, 100.0), scale_record("strong", 2, 1, 4, 160.0)]
    path = write_scale_report(recs, str(tmp_path / "rep"), layer_sweep=json.loads(js.read_text()))
    text = open(path).read()
    assert "## Layer cost against the expert count" in text and f"| 8 | {sweep[1]['patchmoe_x_dense']:.2f} |" in text


@pytest.mark.slow
def test_bench_layer_compiled_against_eager(tmp_path):
    """--choice expert --compile: each of our layers also compiled whole, its row beside the eager one
    (the same routed units and FLOPs), and the compiled / eager line from the paired rounds; --compile
    without a static plan is refused (exit 2, naming the fix)."""
    js = tmp_path / "bench.json"
    shape = ["--batch", "1", "--height", "8", "--width", "8", "--dim", "16", "--hidden", "32", "--experts", "4",
             "--patch", "4", "--repeats", "2", "--warmup", "1", "--skip", "deepspeed,fairscale"]
    out = run_cli("bench", "layer", *shape, "--choice", "expert", "--compile", "--json", str(js), threads=None,
                  timeout=600)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(js.read_text())["rows"]}
    eager, compiled = rows["PatchMoE P=4 EC"], rows["PatchMoE P=4 EC compiled"]
    assert compiled["router_units"] == eager["router_units"] and compiled["gflop_per_step"] == eager["gflop_per_step"]
    ratio = statistics.median(a / b for a, b in zip(compiled["ms_rounds"], eager["ms_rounds"]))
    assert f"PatchMoE P=4 EC: compiled / eager {ratio:.2f}" in out.stdout
    refused = run_cli("bench", "layer", *shape, "--compile", threads=None, timeout=120)
    assert refused.returncode == 2 and "--choice expert or --capacity-factor" in refused.stderr

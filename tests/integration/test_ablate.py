"""`msmoe ablate`: real runs, one table with accuracy, cost and usage per run; a second call redoes nothing."""

import csv
import json
import os

from tests.helpers import ROOT, TINY_DATA, run_cli


def test_ablation_table_from_real_runs_and_resumable(tmp_path):
    hier = tmp_path / "tinyhier.yaml"
    hier.write_text(f"base: {ROOT}/configs/tiny.yaml\nname: tinyhier\nmodel:\n  moe_kind: hierarchical\n"
                    "  hierarchical: {num_groups: 2, experts_per_group: 2, coarse: {num_experts: 2, top_k: 1}, "
                    "fine: {num_experts: 2, top_k: 2}}\n")
    ec = tmp_path / "tinyec.yaml"
    ec.write_text(f"base: {ROOT}/configs/tiny.yaml\nname: tinyec\nmodel:\n  patch_moe:\n"
                  "    router: {num_experts: 4, top_k: 1, choice: expert}\n    capacity_factor: 0.5\n")
    args = ["ablate", "--configs", "configs/tiny.yaml", str(hier), str(ec), "--nproc", "1", "--out", str(tmp_path / "abl"),
            "train.steps=2", "eval.untrained=false", "eval.missing_modalities=false", f"data.path={tmp_path}/data",
            f"data.synth={TINY_DATA}"]
    first = run_cli(*args, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "abl" / "ablation.csv")))
    assert [r["run"] for r in rows] == ["tiny", "tinyhier", "tinyec"]
    for r in rows:
        assert 0 <= float(r["map"]) <= 1 and float(r["flops_per_image"]) > 0
        assert int(r["params_total"]) > int(r["params_active_per_patch"]) > 0
    # expert choice at capacity 0.5, top-1: each expert takes an eighth of the patches, so most go untaken
    summary = json.load(open(tmp_path / "abl" / "tinyec" / "summary.json"))
    untaken = summary["patch_coverage"]["block1"][0]
    assert "expert choice" in rows[2]["model"] and float(rows[2]["unrouted"]) == untaken > 0.4
    assert float(rows[0]["unrouted"]) == 0.0  # dropless token choice
    md = open(tmp_path / "abl" / "ablation.md").read()
    assert "[tiny](tiny/report.md)" in md and "[tinyhier](tinyhier/report.md)" in md
    assert os.path.getsize(tmp_path / "abl" / "ablation.png") > 0
    again = run_cli(*args, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished before, kept") == 3, again.stdout[-2000:]
    assert list(csv.DictReader(open(tmp_path / "abl" / "ablation.csv"))) == rows

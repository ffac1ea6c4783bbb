"""`msmoe ablate`: real runs, one table with accuracy, cost and usage per run; a second call redoes nothing."""

import csv
import os

from tests.helpers import ROOT, TINY_DATA, run_cli


def test_ablation_table_from_real_runs_and_resumable(tmp_path):
    hier = tmp_path / "tinyhier.yaml"
    hier.write_text(f"base: {ROOT}/configs/tiny.yaml\nname: tinyhier\nmodel:\n  moe_kind: hierarchical\n"
                    "  hierarchical: {num_groups: 2, experts_per_group: 2, coarse: {num_experts: 2, top_k: 1}, "
                    "fine: {num_experts: 2, top_k: 2}}\n")
    args = ["ablate", "--configs", "configs/tiny.yaml", str(hier), "--nproc", "1", "--out", str(tmp_path / "abl"),
            "train.steps=2", "eval.untrained=false", "eval.missing_modalities=false", f"data.path={tmp_path}/data",
            f"data.synth={TINY_DATA}"]
    first = run_cli(*args, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "abl" / "ablation.csv")))
    assert [r["run"] for r in rows] == ["tiny", "tinyhier"]
    for r in rows:
        assert 0 <= float(r["map"]) <= 1 and float(r["flops_per_image"]) > 0
        assert int(r["params_total"]) > int(r["params_active_per_patch"]) > 0
    md = open(tmp_path / "abl" / "ablation.md").read()
    assert "[tiny](tiny/report.md)" in md and "[tinyhier](tinyhier/report.md)" in md
    assert os.path.getsize(tmp_path / "abl" / "ablation.png") > 0
    again = run_cli(*args, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished before, kept") == 2, again.stdout[-2000:]
    assert list(csv.DictReader(open(tmp_path / "abl" / "ablation.csv"))) == rows

"""msmoe scale / msmoe report as commands: the SLURM dry run, and (slow) a real sweep with torchrun
whose EP=2 point must train exactly like its EP=1 twin while moving the bytes the EP=1 one does not.
(The sweep plan and the report's arithmetic on hand-made points: tests/unit/scaling/.)"""

import json
import os

import pytest

from tests.helpers import run_cli


def _msmoe(*args, timeout=900):
    return run_cli(*args, timeout=timeout)


def test_scale_slurm_dry_run_is_one_job_array_per_world_size(tmp_path):
    out = _msmoe("scale", "--slurm", "--dry-run", "--world", "2,4", "--ep", "1,2", "--experts", "4,8",
                 "--modes", "strong", "--gpus-per-node", "2", "--device", "cpu", "--partition", "debug",
                 "--run-root", str(tmp_path), "--config", "configs/scale.yaml")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("#SBATCH --array=0-3") == 2
    assert "#SBATCH --nodes=1" in out.stdout and "#SBATCH --nodes=2" in out.stdout
    assert "'train.ep_size=2 model.patch_moe.router.num_experts=8'" in out.stdout


@pytest.mark.slow
def test_real_sweep_and_report(tmp_path):
    runs = tmp_path / "runs"
    out = _msmoe("scale", "--config", "configs/scale.yaml", "--world", "1,2", "--ep", "1,2", "--experts", "4",
                 "--modes", "strong", "--steps", "6", "--run-root", str(runs), f"data.path={tmp_path}/data")
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [json.loads(ln) for ln in open(runs / "points.jsonl")]
    by = {(r["world_size"], r["ep_size"]): r for r in recs}
    assert set(by) == {(1, 1), (2, 1), (2, 2)}
    one, two = by[(2, 1)], by[(2, 2)]
    assert one["a2a_bytes_per_step"]["offrank"] == 0 < two["a2a_bytes_per_step"]["offrank"]
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)  # EP changes where, not what
    for r in recs:
        assert r["samples_per_s"] > 0 and len(r["peak_mem_mb_per_rank"]) == r["world_size"]
        assert all(r["step_time_ms"][k] > 0 for k in ("route", "experts", "backward", "optimizer"))
        assert r["env"]["torch"].startswith("2.13")
    rep = _msmoe("report", "--points", str(runs / "points.jsonl"))
    assert rep.returncode == 0, rep.stderr
    text = open(runs / "report.md").read()
    assert "## Measured points" in text and "## Scaling efficiency (measured)" in text and "MODEL" in text
    assert os.path.getsize(runs / "projection_model.png") > 1000

"""msmoe scale / msmoe report as commands: the SLURM dry run, one point run from a user's own folder
with its own config (the points file lands there), a failing point said in one line, and (slow) a
real sweep with torchrun whose EP=2 point must train exactly like its EP=1 twin while moving the
bytes the EP=1 one does not.
(The sweep plan and the report's arithmetic on hand-made points: tests/unit/scaling/.)"""

import json
import os

import pytest

from tests.helpers import ROOT, TINY_DATA, run_cli


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


def _own_folder(tmp_path):
    """A user's folder outside the checkout, holding its own copy of configs/scale.yaml."""
    text = open(os.path.join(ROOT, "configs", "scale.yaml")).read()
    (tmp_path / "scale.yaml").write_text(text.replace("base: tiny.yaml", f"base: {ROOT}/configs/tiny.yaml"))
    return ["scale", "--config", "scale.yaml", "--world", "1", "--ep", "1", "--experts", "4", "--modes", "weak",
            "--steps", "3", "data.path=data", f"data.synth={TINY_DATA}"]


def test_scale_from_a_users_own_folder(tmp_path):
    out = run_cli(*_own_folder(tmp_path), cwd=str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    recs = [json.loads(ln) for ln in open(tmp_path / "runs" / "scale" / "points.jsonl")]  # the caller's run_root
    assert [(r["mode"], r["world_size"], r["steps"]) for r in recs] == [("weak", 1, 3)]
    assert (tmp_path / "data").is_dir() and not os.path.exists(os.path.join(ROOT, "scale.yaml"))


def test_a_failing_point_is_one_named_line(tmp_path):
    (tmp_path / "data").write_text("a file where the data folder should be\n")
    out = run_cli(*_own_folder(tmp_path), cwd=str(tmp_path), timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr
    said = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(said) == 1 and said[0].startswith("msmoe: error: scale point scale-weak-w1-ep1-e4 failed (exit "), said
    log = tmp_path / "runs" / "scale" / "scale-weak-w1-ep1-e4.log"
    assert str(log) in said[0] or "runs/scale/scale-weak-w1-ep1-e4.log" in said[0]
    assert log.stat().st_size > 0


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

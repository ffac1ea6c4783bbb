"""msmoe scale / msmoe report: the sweep plan, the efficiency and alpha-beta arithmetic on
hand-made points, and (slow) a real sweep with torchrun whose EP=2 point must train exactly like
its EP=1 twin while moving the bytes the EP=1 one does not."""

import json
import os
import subprocess
import sys

import pytest

from launcher.scale import Point, plan
from launcher.scale_report import AlphaBeta, efficiency, fit_alpha_beta, project, write_scale_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _msmoe(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def test_plan_skips_what_ep_cannot_divide_and_runs_one_rank_once():
    points, skipped = plan([1, 2, 4], [1, 2, 4], [4, 6], ["strong", "weak"])
    assert Point("strong", 1, 1, 4) in points and Point("weak", 1, 1, 4) not in points
    assert Point("weak", 4, 4, 4) in points and Point("strong", 2, 2, 6) in points
    assert all(p.world % p.ep == 0 and p.experts % p.ep == 0 for p in points)
    assert any("world 1, EP 2" in s for s in skipped) and any("EP 4" in s and "6 experts" in s for s in skipped)
    assert Point("weak", 2, 2, 4).overrides(8)[2] == "train.p=16"  # weak: the global batch grows with ranks
    assert Point("strong", 2, 2, 4).overrides(8)[2] == "train.p=8"


def _rec(mode, w, ep, e, sps, dispatch=1.0, combine=1.0, fwd_bytes=0.0, calls=0):
    return {"name": f"scale-{mode}-w{w}-ep{ep}-e{e}", "mode": mode, "world_size": w, "ep_size": ep, "num_experts": e,
            "global_batch": 16, "samples_per_s": sps, "patches_per_s_per_rank": 100.0,
            "step_time_ms": {"step": 100.0, "dispatch": dispatch, "combine": combine, "forward": 40.0,
                             "backward": 40.0, "optimizer": 10.0, "route": 1.0, "experts": 5.0, "data": 2.0,
                             "forward_other": 32.0},
            "a2a_bytes_per_step": {"total": 2 * fwd_bytes, "offrank": fwd_bytes, "forward": fwd_bytes,
                                   "backward": fwd_bytes, "calls": calls},
            "peak_mem_mb_per_rank": [100.0] * w, "expert_load_fraction": {"block1": [1 / e] * e},
            "load_imbalance": {"block1": 1.0}, "dropped_fraction": 0.0, "device": "cpu", "backend": "gloo",
            "env": {"torch": "x"}}


def test_efficiency_by_hand():
    recs = [_rec("strong", 1, 1, 4, 100.0), _rec("strong", 2, 2, 4, 150.0), _rec("weak", 2, 2, 4, 180.0)]
    eff = {(r["mode"], r["world"]): r["efficiency"] for r in efficiency(recs)}
    assert eff[("strong", 2)] == pytest.approx(150 / 200)  # 150 samples/s of an ideal 2 x 100
    assert eff[("weak", 2)] == pytest.approx(90 / 100)  # 90 per rank against 100 on one rank


def test_alpha_beta_fit_recovers_the_model_it_was_made_from():
    alpha, beta = 20e-6, 1 / 1e9  # 20 us per peer, 1 GB/s
    recs = []
    for ep, nbytes in ((2, 1e6), (4, 4e6), (8, 2e6), (2, 8e6)):
        calls = 8  # 4 forward all-to-alls (2 layers x dispatch/combine) + 4 backward
        per_call = nbytes / 4
        t = 4 * (alpha * (ep - 1) + beta * per_call * (ep - 1) / ep)
        recs.append(_rec("strong", ep, ep, 8, 10.0, dispatch=1e3 * t / 2, combine=1e3 * t / 2, fwd_bytes=nbytes,
                         calls=calls))
        recs.append(_rec("strong", ep, 1, 8, 10.0, dispatch=0.0, combine=0.0))  # EP=1 twin: nothing to subtract
    ab = fit_alpha_beta(recs)
    assert ab.alpha_s == pytest.approx(alpha, rel=1e-6) and ab.beta_s_per_byte == pytest.approx(beta, rel=1e-6)
    proj = project(recs, ab)
    assert [p["gpus"] for p in proj] == [8, 16, 32, 64, 128, 256, 512, 1024]
    eff = [p["efficiency"] for p in proj]
    assert all(a >= b for a, b in zip(eff, eff[1:])) and 0 < eff[-1] < eff[0] <= 1  # latency term grows with p
    assert AlphaBeta(1.0, 0.0, 1, "").a2a_s(1, 1e9) == 0.0


def test_report_from_hand_made_points(tmp_path):
    recs = [_rec("strong", 1, 1, 4, 100.0), _rec("strong", 2, 1, 4, 160.0),
            _rec("strong", 2, 2, 4, 150.0, dispatch=3.0, combine=3.0, fwd_bytes=1e6, calls=8)]
    path = write_scale_report(recs, str(tmp_path))
    text = open(path).read()
    assert "a MODEL, not a measurement" in text and "| strong | 2 | - | 2 | 4 |" in text
    for png in ("throughput.png", "breakdown.png", "a2a_volume.png", "memory.png", "expert_load.png",
                "efficiency.png", "projection_model.png"):
        assert os.path.getsize(tmp_path / png) > 1000, png


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

"""`msmoe convert --num-experts` on a real run's DeepSpeed checkpoint: upcycle 3 -> 24 keeps the
model's outputs (same retrieval metrics from the converted checkpoint) and training continues
from it; pruning to 2 experts gives a checkpoint that loads and evaluates."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = "{num_train_ids: 24, num_test_ids: 8, num_cameras: 3, images_per_camera: 3, height: 64, width: 32}"


def _cli(*args, tmp):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=400)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_upcycle_and_prune_a_trained_run(tmp_path):
    tmp = str(tmp_path)
    common = [f"out_dir={tmp}/runs", f"data.path={tmp}/data", f"data.synth={TINY_DATA}", "eval.untrained=false"]
    _cli("train", "--config", "configs/tiny.yaml", "--no-progress", "name=base", "train.steps=6",
         "model.patch_moe.router.num_experts=3", *common, tmp=tmp)
    base = json.load(open(f"{tmp}/runs/base/summary.json"))
    src = f"{tmp}/runs/base/checkpoints"

    out = _cli("convert", "--src", src, "--out", f"{tmp}/up", "--num-experts", "24", "--mode", "upcycle", tmp=tmp)
    assert "experts [3] -> 24" in out.stdout
    assert len([f for f in os.listdir(f"{tmp}/up/step0000006") if f.startswith("layer_0_expert_")]) == 24
    _cli("eval", "--run-dir", f"{tmp}/runs/base", "--checkpoint", f"{tmp}/up",
         "model.patch_moe.router.num_experts=24", tmp=tmp)
    ev = json.load(open(f"{tmp}/runs/base/eval.json"))
    assert ev["map"] == pytest.approx(base["map"], abs=1e-6) and ev["cmc"] == pytest.approx(base["cmc"], abs=1e-6)

    _cli("train", "--config", "configs/tiny.yaml", "--no-progress", "name=cont", "train.steps=4",
         "--init-from", f"{tmp}/up", "model.patch_moe.router.num_experts=24",
         "model.patch_moe.router.bias_update_rate=0.01", *common, tmp=tmp)
    cont = json.load(open(f"{tmp}/runs/cont/summary.json"))
    assert cont["num_experts"] == 24 and cont["steps"] == 4 and all(math.isfinite(x) for x in cont["loss_history"])

    _cli("convert", "--src", src, "--out", f"{tmp}/pruned", "--num-experts", "2", "--mode", "prune",
         "--usage", f"{tmp}/runs/base/summary.json", tmp=tmp)
    _cli("eval", "--run-dir", f"{tmp}/runs/base", "--checkpoint", f"{tmp}/pruned",
         "model.patch_moe.router.num_experts=2", tmp=tmp)
    ev2 = json.load(open(f"{tmp}/runs/base/eval.json"))
    assert 0 < ev2["map"] <= 1

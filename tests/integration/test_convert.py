"""msmoe convert on real checkpoints.

`msmoe convert --num-experts` on a real run's DeepSpeed checkpoint: upcycle 3 -> 24 keeps the
model's outputs (same retrieval metrics from the converted checkpoint) and training continues
from it; pruning to 2 experts gives a checkpoint that loads and evaluates.

`msmoe convert` to another EP size carries the optimizer state: save at EP=2 on 2 ranks,
convert, load at EP=1 on 1 rank and at EP=4 on 4 ranks -> the same outputs, and the next
training step gives the same loss and weights as continuing at EP=2 (tests/dist/ds_reshard_check.py;
no balance loss there: it is computed per rank, so it would depend on how the batch is split).
"""

import json
import math
import os

import pytest

from tests.helpers import TINY_DATA, run_cli, run_torchrun


def _cli(*args, tmp):
    return run_cli(*args, timeout=400, check=True)


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


@pytest.mark.slow
def test_reshard_ep2_to_ep1_and_ep4(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_torchrun("ds_reshard_check.py", 2, ["--phase", "save", "--ckpt", ckpt], str(tmp_path / "save"))
    for ep in (1, 4):
        out = str(tmp_path / f"ep{ep}_ckpt")
        proc = run_cli("convert", "--src", ckpt, "--out", out, "--ep-size", str(ep), threads=None, timeout=None)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"EP 2 -> {ep}" in proc.stdout
        files = sorted(os.listdir(os.path.join(out, "s3")))
        assert [f for f in files if f.startswith("expp_rank_")] == [f"expp_rank_{r}_mp_rank_00_optim_states.pt"
                                                                     for r in range(ep)]
        reports, _ = run_torchrun("ds_reshard_check.py", ep, ["--phase", "load", "--ckpt", out],
                                  str(tmp_path / f"load{ep}"))
        for r in reports:
            assert r["ep_size"] == ep and r["same_names"]
            assert r["logits_err"] < 1e-6, r
            assert abs(r["loss"] - r["ref_loss"]) < 1e-6 * max(1, abs(r["ref_loss"])), r
            assert r["weights_err"] < 1e-5, r


@pytest.mark.slow
def test_reshard_refuses_bad_sizes(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_torchrun("ds_reshard_check.py", 2, ["--phase", "save", "--ckpt", ckpt], str(tmp_path / "save"))
    proc = run_cli("convert", "--src", ckpt, "--out", str(tmp_path / "x"), "--ep-size", "3", threads=None,
                   timeout=None)
    assert proc.returncode != 0 and "num_experts=4, not divisible by the new ep_size=3" in proc.stderr


@pytest.mark.slow
def test_upcycle_one_group_of_a_hierarchical_run(tmp_path):
    """Hierarchical [2, 2, 2] -> group 0 upcycled to 4: [4, 2, 2] evaluates the same, and trains on."""
    tmp = str(tmp_path)
    common = [f"out_dir={tmp}/runs", f"data.path={tmp}/data", f"data.synth={TINY_DATA}", "eval.untrained=false"]
    hier = ["model.moe_kind=hierarchical", "model.hierarchical={num_groups: 3, experts_per_group: 2, "
            "coarse: {num_experts: 3, top_k: 2}, fine: {num_experts: 2, top_k: 1}, placement: spread}"]
    _cli("train", "--config", "configs/tiny.yaml", "--no-progress", "name=hbase", "train.steps=4", *hier, *common,
         tmp=tmp)
    base = json.load(open(f"{tmp}/runs/hbase/summary.json"))
    out = _cli("convert", "--src", f"{tmp}/runs/hbase/checkpoints", "--out", f"{tmp}/g0",
               "--config", f"{tmp}/runs/hbase/config.yaml", "--group", "0", "--num-experts", "4", tmp=tmp)
    grown = ["model.hierarchical.experts_per_group=[4,2,2]", "model.hierarchical.fine.num_experts=4"]
    assert "'model.hierarchical.experts_per_group=[4,2,2]' model.hierarchical.fine.num_experts=4" in out.stdout
    assert len([f for f in os.listdir(f"{tmp}/g0/step0000004") if f.startswith("layer_0_expert_")]) == 8
    _cli("eval", "--run-dir", f"{tmp}/runs/hbase", "--checkpoint", f"{tmp}/g0", *grown, tmp=tmp)
    ev = json.load(open(f"{tmp}/runs/hbase/eval.json"))
    assert ev["map"] == pytest.approx(base["map"], abs=1e-6) and ev["cmc"] == pytest.approx(base["cmc"], abs=1e-6)
    _cli("train", "--config", "configs/tiny.yaml", "--no-progress", "name=hcont", "train.steps=2",
         "--init-from", f"{tmp}/g0", *hier, *grown, *common, tmp=tmp)
    cont = json.load(open(f"{tmp}/runs/hcont/summary.json"))
    assert cont["num_experts"] == 8 and all(math.isfinite(x) for x in cont["loss_history"])

"""Elastic expert parallelism with real processes: ``--resume`` at another EP / world size reshards
the checkpoint on load (training/checkpoint/elastic.py).

- A run at 4 processes, EP=4 (train.elastic_ep) stops at step 2 and continues on 2 processes at
  EP=2, by a plain ``--resume train.ep_size=2`` and by ``--auto-resume`` with elastic_ep (the path
  of an elastic restart): both end bit for bit where ``msmoe convert --ep-size 2`` + ``--resume``
  ends.
- A layer-level PatchMoE model whose loss does not depend on the batch split: 4 ranks EP=4, saved,
  continued on 2 ranks EP=2 = an uninterrupted 4-rank run within float tolerance
  (tests/dist/ds_elastic_check.py).
- EP 2 -> 1 -> (world 1 -> 2 at EP=1) -> 2 at ZeRO 0; a ZeRO 1 checkpoint of 1 rank continues on 2
  ranks at EP=2 and exports like any other.
- ZeRO 1 at EP=2 on 2 ranks continues at EP=1, on 1 rank and on 2, with its Adam moments: the same
  losses and weights as ``msmoe convert --ep-size 1`` (a ZeRO 0 checkpoint) + a ZeRO 0 resume, and as
  the uninterrupted ZeRO 1 run (2 ranks), within float tolerance.
"""

import json
import os
import shutil

import pytest
import torch

from tests.helpers import TINY_DATA, exported_metrics, run_cli, run_torchrun
from tests.integration.test_reliability import _weights
from training.checkpoint import store

STEPS, STOP = 4, 2


def _train(tmp, name, nproc, *extra, steps=STEPS, check=True):
    return run_cli("train", "--config", "configs/tiny.yaml", "--no-progress", f"name={name}",
                   f"out_dir={tmp}/runs", f"data.path={tmp}/data", f"data.synth={TINY_DATA}",
                   f"train.steps={steps}", "train.ckpt_every=2", "eval.untrained=false",
                   "model.patch_moe.router.num_experts=4", *extra, nproc=nproc, timeout=900, check=check)


def _copy_run(tmp, src, dst):
    shutil.copytree(f"{tmp}/runs/{src}", f"{tmp}/runs/{dst}")


def _same_run(tmp, a, b):
    sa = json.load(open(f"{tmp}/runs/{a}/summary.json"))
    sb = json.load(open(f"{tmp}/runs/{b}/summary.json"))
    assert sa["steps"] == sb["steps"] == STEPS and sa["loss_history"] == sb["loss_history"]
    wa, wb = _weights(f"{tmp}/runs/{a}/checkpoints"), _weights(f"{tmp}/runs/{b}/checkpoints")
    assert wa.keys() == wb.keys() and len(wa) > 10
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    return sa


@pytest.mark.slow
def test_ep4_on_4_continues_at_ep2_on_2_exactly_as_convert_then_resume(tmp_path):
    tmp = str(tmp_path)
    proc = _train(tmp, "base", 4, "train.ep_size=4", "train.elastic_ep=true", "--stop-at", str(STOP))
    assert f"stopped at step {STOP}" in proc.stdout
    for name in ("plain", "auto", "converted"):
        _copy_run(tmp, "base", name)
    tag = store.tag_of(STOP)

    # the reference: convert offline, put the converted checkpoint in place of the run's, resume at EP=2
    ckpt = f"{tmp}/runs/converted/checkpoints"
    shutil.rmtree(ckpt)
    out = run_cli("convert", "--src", f"{tmp}/runs/base/checkpoints", "--out", ckpt, "--ep-size", "2", check=True)
    assert "EP 4 -> 2" in out.stdout
    ref = _train(tmp, "converted", 2, "train.ep_size=2", "--resume")
    assert f"resumed 'converted' at step {STOP}\n" in ref.stdout  # nothing to reshard

    plain = _train(tmp, "plain", 2, "train.ep_size=2", "--resume")
    assert f"resumed 'plain' at step {STOP} (resharded EP 4 -> 2)" in plain.stdout
    assert os.path.isfile(f"{tmp}/runs/plain/checkpoints/.elastic/ep2/{tag}/expp_rank_1_mp_rank_00_optim_states.pt")
    # an elastic restart on fewer ranks: the same config (ep_size=4, elastic_ep) gets EP=2 at 2 ranks
    auto = _train(tmp, "auto", 2, "train.ep_size=4", "train.elastic_ep=true", "--auto-resume")
    assert f"resumed 'auto' at step {STOP} (resharded EP 4 -> 2)" in auto.stdout
    s = _same_run(tmp, "plain", "converted")
    _same_run(tmp, "auto", "converted")
    assert s["ep_size"] == 2 and s["world_size"] == 2


@pytest.mark.slow
def test_layer_level_4_to_2_matches_an_uninterrupted_run(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_torchrun("ds_elastic_check.py", 4, ["--phase", "save", "--ckpt", ckpt], str(tmp_path / "save"))
    reports, _ = run_torchrun("ds_elastic_check.py", 2, ["--phase", "resume", "--ckpt", ckpt],
                              str(tmp_path / "resume"))
    for r in reports:
        assert r["ep_size"] == 2 and r["note"] == "resharded EP 4 -> 2" and r["step"] == 3 and r["same_names"]
        assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-5, abs=1e-6), r
        # Adam divides by sqrt(v): float noise in a near-zero gradient (the router's biases, whose
        # gradients nearly cancel) moves a weight by up to ~1e-5 after two steps at lr 1e-2
        assert r["weights_max_abs"] < 1e-4 and r["weights_rel"] < 1e-3, r
        assert r["staged"] == ["step0000003"]
    print(f"4 -> 2 vs uninterrupted: max abs weight difference {max(r['weights_max_abs'] for r in reports):.3g} "
          f"({reports[0]['worst']}), losses {reports[0]['losses']} vs {reports[0]['ref_losses']}")


@pytest.mark.slow
def test_ep_and_world_size_changes_at_zero0_and_zero1_refused(tmp_path):
    tmp = str(tmp_path)
    steps = ["train.steps=8"]
    _train(tmp, "r", 2, "train.ep_size=2", "--stop-at", "2", *steps)
    one = _train(tmp, "r", 1, "train.ep_size=1", "--resume", "--stop-at", "4", *steps)
    assert "resumed 'r' at step 2 (resharded EP 2 -> 1)" in one.stdout
    wider = _train(tmp, "r", 2, "train.ep_size=1", "--resume", "--stop-at", "6", *steps)  # world 1 -> 2, EP 1
    assert "resumed 'r' at step 4\n" in wider.stdout
    two = _train(tmp, "r", 2, "train.ep_size=2", "--resume", *steps)
    assert "resumed 'r' at step 6 (resharded EP 1 -> 2)" in two.stdout
    s = json.load(open(f"{tmp}/runs/r/summary.json"))
    assert s["steps"] == 8 and len(s["loss_history"]) == 8 and s["ep_size"] == 2
    assert os.listdir(f"{tmp}/runs/r/checkpoints/.elastic/ep2") == ["step0000006"]  # older copies deleted

    _train(tmp, "z", 1, "train.zero_stage=1", "--stop-at", "2", *steps)
    proc = _train(tmp, "z", 2, "train.zero_stage=1", "train.ep_size=2", "--resume", "--stop-at", "4", *steps)
    assert ("resumed 'z' at step 2 (optimizer state moved from EP=1 on 1 rank(s), ZeRO stage 1 to EP=2 on 2 "
            "rank(s), ZeRO stage 1)") in proc.stdout
    # the ZeRO-1 checkpoint (EP=2, 2 ranks) exports like any other: one plain process evaluates it as the engine does
    run_cli("export", "--run-dir", f"{tmp}/runs/z", "--out", f"{tmp}/z.safetensors", check=True)
    run_cli("eval", "--run-dir", f"{tmp}/runs/z", "train.ep_size=1", check=True)  # saved at EP=2 on 2 ranks
    ev = json.load(open(f"{tmp}/runs/z/eval.json"))
    m = exported_metrics(f"{tmp}/z.safetensors", f"{tmp}/data", f"{tmp}/zq.npy")
    assert not m["deepspeed"] and abs(m["map"] - ev["map"]) < 1e-6 and m["cmc"] == pytest.approx(ev["cmc"][:20])


def _close(tmp, a, b, rel=1e-5, weight_abs=1e-5):
    """Runs ``a`` and ``b`` agree within float tolerance: losses of every step, final weights. Returns a's
    losses and the largest weight difference. (An optimizer restarted at the resume instead of carried
    over moves the weights by ~1e-2 here and the step-4 loss by ~6e-3.)"""
    sa = json.load(open(f"{tmp}/runs/{a}/summary.json"))
    sb = json.load(open(f"{tmp}/runs/{b}/summary.json"))
    assert sa["steps"] == sb["steps"] == STEPS
    assert sa["loss_history"] == pytest.approx(sb["loss_history"], rel=rel), (a, b)
    wa, wb = _weights(f"{tmp}/runs/{a}/checkpoints"), _weights(f"{tmp}/runs/{b}/checkpoints")
    assert wa.keys() == wb.keys() and len(wa) > 10
    worst = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    assert worst < weight_abs, (a, b, worst)
    return sa["loss_history"], worst


@pytest.mark.slow
def test_zero1_ep2_continues_at_ep1_with_its_adam_moments(tmp_path):
    tmp = str(tmp_path)
    z1 = ("train.zero_stage=1", "train.ep_size=2")
    _train(tmp, "base", 2, *z1, "--stop-at", str(STOP))
    for name in ("ref", "one", "two", "converted"):
        _copy_run(tmp, "base", name)
    ckpt = f"{tmp}/runs/converted/checkpoints"
    shutil.rmtree(ckpt)
    out = run_cli("convert", "--src", f"{tmp}/runs/base/checkpoints", "--out", ckpt, "--ep-size", "1", check=True)
    assert "EP 2 -> 1, ZeRO stage 1 -> 0" in out.stdout
    conv = _train(tmp, "converted", 1, "train.zero_stage=0", "train.ep_size=1", "--resume")
    assert f"resumed 'converted' at step {STOP}\n" in conv.stdout  # a ZeRO 0 checkpoint at EP=1: loads as it is

    one = _train(tmp, "one", 1, "train.zero_stage=1", "train.ep_size=1", "--resume")
    assert (f"resumed 'one' at step {STOP} (optimizer state moved from EP=2 on 2 rank(s), ZeRO stage 1 to EP=1 "
            "on 1 rank(s), ZeRO stage 1)") in one.stdout
    assert sorted(os.listdir(f"{tmp}/runs/one/checkpoints/.elastic/ep1")) == [store.tag_of(STOP)]
    two = _train(tmp, "two", 2, "train.zero_stage=1", "train.ep_size=1", "--resume")
    assert "to EP=1 on 2 rank(s), ZeRO stage 1)" in two.stdout
    _train(tmp, "ref", 2, *z1, "--resume")  # the same layout: DeepSpeed's own files, as if never stopped

    losses, worst = _close(tmp, "one", "converted")
    ref_losses, worst_two = _close(tmp, "two", "ref")
    print(f"ZeRO 1 EP=2 -> EP=1 continued: losses (1 rank) {losses[STOP:]} vs the converted checkpoint at ZeRO 0 "
          f"{json.load(open(f'{tmp}/runs/converted/summary.json'))['loss_history'][STOP:]} (weights within "
          f"{worst:.2g}); 2 ranks {ref_losses[STOP:]} vs uninterrupted (weights within {worst_two:.2g})")

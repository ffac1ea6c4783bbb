"""The training job end to end, under torchrun with 2 processes (CPU, gloo).

  * EP=2 equals EP=1: the whole ReID model in the DeepSpeed engine gives the same loss curve and
    the same retrieval metrics whether its experts are split over the 2 ranks or replicated.
  * Resume is exact: N steps, stop, resume for M steps == N+M steps straight (loss and weights).
  * Every ablation config of the thesis's multi-scale fusion builds and steps with its own scale count (shrunk);
    one of each family trains end to end.
  * bf16: the whole model in DeepSpeed's bf16 trains close to fp32 (LOSS_ATOL), configs/gpu.yaml shrunk.

Bound (stated once, used below):
  LOSS_ATOL      |bf16 loss - fp32 loss| per step over the first steps of the tiny model
"""

import glob
import json
import os
import subprocess

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, TINY_DATA, cli_command, cli_env, exported_metrics, run_cli

LOSS_ATOL = 0.1


def _train(tmp, name, nproc, *overrides, extra=(), config="configs/tiny.yaml", timeout=600, env=None):
    return run_cli("train", "--config", config, "--no-progress", *extra, f"name={name}", f"out_dir={tmp}/runs",
                   f"data.path={tmp}/data", f"data.synth={TINY_DATA}", *overrides, nproc=nproc, timeout=timeout,
                   check=True, env=env)


PLOTS = {"MSMOE_REPORT_PLOTS": "1"}  # the tests' runs leave the report's plots out unless asked (tests/helpers.py)


def _summary(tmp, name):
    with open(os.path.join(tmp, "runs", name, "summary.json")) as fh:
        return json.load(fh)


def _weights(tmp, name, tag):
    """Every tensor DeepSpeed saved for ``tag`` (dense per rank file + one file per global expert)."""
    out = {}
    for f in sorted(glob.glob(os.path.join(tmp, "runs", name, "checkpoints", tag, "*model_states.pt"))):
        sd = torch.load(f, map_location="cpu", weights_only=False)
        sd = sd.get("module", sd)  # expert files hold the state dict itself
        for k, v in sd.items():
            out[f"{os.path.basename(f)}:{k}"] = v
    assert out, f"no checkpoint files for {name}/{tag}"
    return out


def _eval(tmp, name, nproc):
    """`msmoe eval` of a run's newest checkpoint; returns its eval.json."""
    run_dir = os.path.join(tmp, "runs", name)
    proc = run_cli("eval", "--run-dir", run_dir, "--nproc", str(nproc), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(run_dir, "eval.json")) as fh:
        return json.load(fh)


@pytest.mark.slow
def test_ep2_equals_ep1_on_the_full_model(tmp_path):
    """64 experts (most of them idle in a step, a different set each step: the persistent gradient
    buffers zero and rewrite them) trained at EP=1 and EP=2 on 2 processes."""
    tmp = str(tmp_path)
    for ep in (1, 2):
        _train(tmp, f"ep{ep}", 2, f"train.ep_size={ep}", "train.steps=6", "eval.untrained=false",
               "model.patch_moe.router.num_experts=64", env=PLOTS if ep == 2 else None)
    one, two = _summary(tmp, "ep1"), _summary(tmp, "ep2")
    assert two["ep_size"] == 2 and one["ep_size"] == 1 and two["world_size"] == 2 and two["num_experts"] == 64
    assert len(two["loss_history"]) == 6
    for a, b in zip(one["loss_history"], two["loss_history"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one["loss_history"], two["loss_history"])
    assert abs(one["map"] - two["map"]) < 1e-4 and one["rank1"] == two["rank1"]
    # the expert load seen by both is the same routing
    assert one["expert_load"]["block1"]["whole_run"] == two["expert_load"]["block1"]["whole_run"]
    # EP=2 moved patches; EP=1 did not
    assert two["a2a_bytes_per_step"]["offrank"] > 0 and one["a2a_bytes_per_step"]["total"] == 0
    for f in ("report.md", "cmc.png", "loss.png", "expert_load_block1.png", "fusion_weights.png", "step_time.png"):
        assert os.path.getsize(os.path.join(tmp, "runs", "ep2", f)) > 0
    # MSMOE_REPORT_PLOTS=0 (ep1): the same report without plots or links to them, and saying so
    assert not glob.glob(os.path.join(tmp, "runs", "ep1", "*.png"))
    plain = open(os.path.join(tmp, "runs", "ep1", "report.md")).read()
    assert "![" not in plain and "_Plots not drawn (MSMOE_REPORT_PLOTS=0)._" in plain and "## Expert load" in plain
    for key in ("map", "rank1", "rank5", "rank10", "loss_history", "samples_per_s", "world_size", "ep_size",
                "num_experts", "steps", "step_time_ms", "expert_load"):
        assert key in two
    # the thesis's cost metrics count the whole model at any EP size; usage follows the same routing
    assert one["model_cost"]["parameters"] == two["model_cost"]["parameters"]
    assert two["model_cost"]["parameters"]["total"] > two["model_cost"]["parameters"]["active_per_patch"] > 0
    assert two["model_cost"]["inference"]["flops_per_image"] == pytest.approx(
        one["model_cost"]["inference"]["flops_per_image"], rel=0.05)
    assert two["moe_usage"]["layers"]["block1"]["share"] == pytest.approx(one["moe_usage"]["layers"]["block1"]["share"])
    # `msmoe eval` on the saved checkpoint reproduces the run's own final evaluation
    ev = _eval(tmp, "ep2", nproc=2)
    assert ev["step"] == 6 and abs(ev["map"] - two["map"]) < 1e-6 and ev["cmc"] == pytest.approx(two["cmc"])
    # `msmoe export`: the 64 experts of both ranks in one file; one plain process reproduces the metrics
    model = f"{tmp}/model.safetensors"
    run_cli("export", "--run-dir", f"{tmp}/runs/ep2", "--out", model, check=True)
    m = exported_metrics(model, f"{tmp}/data", f"{tmp}/q.npy")
    assert not m["deepspeed"] and not m["distributed"]
    assert abs(m["map"] - two["map"]) < 1e-6 and m["cmc"] == pytest.approx(two["cmc"][:20])
    # `msmoe embed` writes the same features with the image names
    run_cli("embed", "--model", model, "--data", f"{tmp}/data", "--split", "query", "--out", f"{tmp}/q.safetensors",
            check=True)
    from safetensors import safe_open

    with safe_open(f"{tmp}/q.safetensors", framework="np") as fh:
        feats, names = fh.get_tensor("features"), json.loads(fh.metadata()["names"])
    assert np.allclose(feats, np.load(f"{tmp}/q.npy"), atol=1e-6) and len(names) == len(feats) == two["num_valid_queries"] + two["num_skipped_queries"]


@pytest.mark.slow
def test_hierarchical_model_ep2_equals_ep1(tmp_path):
    """The ReID model with HierarchicalMoE blocks (3 groups x 4 fine experts) trains the same with
    its 12 experts split over 2 ranks as replicated; top-p fine routing reports active experts per step."""
    tmp = str(tmp_path)
    hier = ("model.moe_kind=hierarchical", "model.hierarchical={num_groups: 3, experts_per_group: 4, "
            "coarse: {num_experts: 3, top_k: 1}, fine: {num_experts: 4, dynamic_top_p: 0.5, k_min: 1, k_max: 3}}")
    for ep in (1, 2):
        _train(tmp, f"h{ep}", 2, *hier, f"train.ep_size={ep}", "train.steps=5", "eval.untrained=false")
    one, two = _summary(tmp, "h1"), _summary(tmp, "h2")
    assert two["num_experts"] == 12 and two["ep_size"] == 2
    for a, b in zip(one["loss_history"], two["loss_history"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one["loss_history"], two["loss_history"])
    act = two["history"]["active_per_step"]
    assert len(act) == 5 and all(1.0 <= a <= 3.0 for a in act) and act == one["history"]["active_per_step"]


@pytest.mark.slow
def test_modality_streams_with_given_groups_ep2_equals_ep1(tmp_path):
    """Per-modality streams, hierarchical blocks routing coarse by the given modality (3 groups x 2
    experts) and the hierarchical head (3 modalities x 3 scales x 2 experts, top-1): 6 and 18 experts
    over 2 ranks train as replicated; the report evaluates each modality absent."""
    tmp = str(tmp_path)
    streams = ("model.streams=per_modality", "model.moe_kind=hierarchical",
               "model.hierarchical={num_groups: 3, experts_per_group: 2, coarse_mode: given, "
               "coarse: {num_experts: 3, top_k: 1}, fine: {num_experts: 2, top_k: 2}}",
               "model.fusion=hierarchical", "model.hierarchical_fusion={experts_per_cell: 2, top_k: 1, "
               "expert: {kind: seed, hidden_dim: 64, dropout: 0.0}}")
    for ep in (1, 2):
        _train(tmp, f"s{ep}", 2, *streams, f"train.ep_size={ep}", "train.steps=4", "eval.untrained=false",
               env=PLOTS if ep == 2 else None)
    one, two = _summary(tmp, "s1"), _summary(tmp, "s2")
    assert two["num_experts"] == 6 and two["ep_size"] == 2
    for a, b in zip(one["loss_history"], two["loss_history"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one["loss_history"], two["loss_history"])
    assert one["expert_load"]["block1"]["whole_run"] == two["expert_load"]["block1"]["whole_run"]
    assert len(two["fusion_weight_mean"]) == 9  # (modality, scale) weights
    report = open(os.path.join(tmp, "runs", "s2", "report.md")).read()
    assert "| block1 | 0.33 | 0.33 | 0.33 |" in report  # given groups: each modality's patches, a third each
    for png in ("group_load.png", "modal_fusion.png"):
        assert os.path.getsize(os.path.join(tmp, "runs", "s2", png)) > 0
    for a, b in zip(one["fusion_weight_mean"], two["fusion_weight_mean"]):
        assert abs(a - b) < 1e-5
    assert set(two["missing_modality"]) == {"without_rgb", "without_nir", "without_tir"}
    for k, v in two["missing_modality"].items():
        assert abs(v["map"] - one["missing_modality"][k]["map"]) < 1e-4


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    tmp = str(tmp_path)
    common = ("train.ep_size=2", "train.steps=8", "train.ckpt_every=100", "eval.untrained=false")
    _train(tmp, "straight", 2, *common)
    out = _train(tmp, "resumed", 2, *common, extra=("--stop-at", "3"))
    assert "stopped at step 3" in out.stdout
    assert not os.path.exists(os.path.join(tmp, "runs", "resumed", "summary.json"))
    out = _train(tmp, "resumed", 2, *common, extra=("--resume",))
    assert "resumed 'resumed' at step 3" in out.stdout
    a, b = _summary(tmp, "straight"), _summary(tmp, "resumed")
    assert b["steps"] == 8 and len(b["loss_history"]) == 8
    assert a["loss_history"] == b["loss_history"]
    wa, wb = _weights(tmp, "straight", "step0000008"), _weights(tmp, "resumed", "step0000008")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_resume_without_checkpoint_says_so(tmp_path):
    with pytest.raises(AssertionError, match="no complete checkpoint in"):
        _train(str(tmp_path), "fresh", 1, "train.steps=2", extra=("--resume",))


ABLATION_SHRINK = ("model.dim=32", "model.depth=2", "model.moe_blocks=[1]", "model.stem_stride=4",
                   "model.patch_moe.expert.hidden_dim=64", "train.steps=2", "train.p=8", "train.k=2",
                   "train.ep_size=1", "train.warmup_steps=1", "eval.untrained=false", "eval.batch_size=32")
# one config of each family trains for real (gate, scales, streams, given modality groups); the temperature
# variants change one router setting, which the in-process step below covers for every config
ABLATIONS_TRAINED = ("gate3", "scales5", "streams", "modal_given")


def _ablation_settings(path):
    import yaml

    raw = yaml.safe_load(open(path))
    return raw, raw["model"].get("multiscale", {})


def test_every_ablation_config_builds_and_takes_a_step():
    """Every config in configs/ablations (the thesis's fusion plan and the stream ablations), shrunk: its
    model is built as configured and one forward/backward gives fusion weights over its own scales."""
    from reid.data import Batch
    from reid.model import ReIDModel
    from training.config import load_config

    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "ablations", "*.yaml")))
    assert {os.path.basename(p)[:-5] for p in paths} >= set(ABLATIONS_TRAINED)
    g = torch.Generator().manual_seed(0)
    b, h, w = 4, 64, 32
    batch = Batch(torch.randn(b, 3, h, w, generator=g), torch.randn(b, 1, h, w, generator=g),
                  torch.randn(b, 1, h, w, generator=g), torch.arange(b) // 2, torch.arange(b) % 3)
    for p in paths:
        raw, ms_raw = _ablation_settings(p)
        cfg = load_config(p, list(ABLATION_SHRINK))
        ms = cfg.model.multiscale_config()
        for key, value in ms_raw.items():  # the stream ablations keep the fusion's
            assert getattr(ms, key) == (tuple(value) if isinstance(value, list) else value), (p, key)
        torch.manual_seed(0)
        out = ReIDModel(cfg.model, num_classes=3)(batch)
        assert out.fusion_weights.shape == (b, len(ms.scales)), p
        torch.testing.assert_close(out.fusion_weights.sum(1), torch.ones(b))
        (out.logits.sum() + out.aux_loss).backward()


@pytest.mark.slow
def test_one_ablation_config_of_each_family_trains(tmp_path):
    tmp = str(tmp_path)
    paths = [os.path.join(ROOT, "configs", "ablations", f"{n}.yaml") for n in ABLATIONS_TRAINED]
    _train(tmp, "warm", 1, *ABLATION_SHRINK)  # makes the data once, before the parallel runs
    for i in range(0, len(paths), 2):
        pair = paths[i:i + 2]
        procs = [subprocess.Popen(cli_command("train", "--config", p, "--no-progress", f"out_dir={tmp}/runs",
                                              f"data.path={tmp}/data", f"data.synth={TINY_DATA}", *ABLATION_SHRINK),
                                  cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for p in pair]
        for p, proc in zip(pair, procs):
            log = proc.communicate(timeout=300)[0]
            assert proc.returncode == 0, f"{p}:\n{log[-3000:]}"
    for p in paths:
        raw, ms_raw = _ablation_settings(p)
        s = _summary(tmp, raw["name"])
        ms = s["config"]["model"]["multiscale"]
        for key, value in ms_raw.items():
            assert ms[key] == value
        assert len(s["fusion_weight_mean"]) == len(ms.get("scales", [4, 8, 16]))
        assert s["steps"] == 2


@pytest.mark.slow
def test_tiny_model_trains_in_bf16_at_ep2_close_to_fp32_and_evaluates_from_its_checkpoint(tmp_path):
    tmp = str(tmp_path)
    common = ("train.ep_size=2", "train.steps=8", "eval.untrained=false")
    _train(tmp, "fp32", 2, *common)
    for zero in (0, 1, 2):
        _train(tmp, f"bf16_z{zero}", 2, *common, "train.precision=bf16", f"train.zero_stage={zero}")
    ref = _summary(tmp, "fp32")["loss_history"]
    for zero in (0, 1, 2):
        s = _summary(tmp, f"bf16_z{zero}")
        losses = s["loss_history"]
        assert len(losses) == 8 and all(abs(a - b) < LOSS_ATOL for a, b in zip(losses, ref)), (zero, losses, ref)
        assert losses[-1] < losses[0]  # it learns
        assert s["skipped_steps"] == []
    ev = _eval(tmp, "bf16_z1", nproc=2)
    s = _summary(tmp, "bf16_z1")
    assert ev["step"] == 8 and abs(ev["map"] - s["map"]) < 1e-6


@pytest.mark.slow
def test_gpu_config_runs_a_few_steps_shrunk(tmp_path):
    """configs/gpu.yaml as written (bf16, ZeRO 1, seed experts, 4 MoE blocks), only smaller: 2 ranks."""
    tmp = str(tmp_path)
    shrink = (f"data.synth={TINY_DATA}", "model.dim=32", "model.stem_stride=4", "model.patch_moe.patch_size=4",
              "model.patch_moe.expert.hidden_dim=32", "model.patch_moe.router.num_experts=4", "train.ep_size=2",
              "train.steps=3", "train.p=8", "train.k=2", "train.warmup_steps=1", "eval.untrained=false",
              "eval.batch_size=32")
    _train(tmp, "gpu_small", 2, *shrink, config="configs/gpu.yaml")
    s = _summary(tmp, "gpu_small")
    assert s["config"]["train"]["precision"] == "bf16" and s["config"]["train"]["zero_stage"] == 1
    assert s["moe_layers"] == 4 and s["steps"] == 3 and all(x == x for x in s["loss_history"])

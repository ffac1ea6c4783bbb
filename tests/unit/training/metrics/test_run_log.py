"""Rank 0's metrics writers (training/metrics/run_log.py): the record's flattening into TensorBoard tags,
metrics.jsonl and TensorBoard continuing after a resume without a duplicated step, the expert-load
heatmap, and W&B: optional, a clear error when asked for without the package."""

import json
import sys
import types

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.config import ConfigError
from training.metrics.interval import interval_record
from training.metrics.records import StepResult
from training.metrics.run_log import METRICS_FILE, RunLog, check_wandb, flatten, keep_until, load_heatmap, read_metrics


def _record(step, loss, load=(3, 1, 0, 4)):
    return interval_record(step=step, result=StepResult(False, loss, loss - 1, 0.5, 0.01, 2.0, False), lr=1e-3,
                           seconds=2.0, steps=4, total_steps=20, samples_per_step=16,
                           stages_s={"forward": 0.25, "route": 0.01}, layer_names=["block1"], load=[list(load)],
                           dropped=[0.125], active=2.0, a2a_bytes={"total": 800, "offrank": 400})


def test_interval_record_arithmetic():
    r = _record(8, 3.0)
    assert r["samples_per_s"] == 16 * 4 / 2.0 and r["eta_s"] == (2.0 / 4) * (20 - 8)
    assert r["step_time_ms"] == {"step": 500.0, "forward": 250.0, "route": 10.0}
    assert r["expert_load"] == {"block1": [3 / 8, 1 / 8, 0.0, 4 / 8]}
    assert r["dropped_fraction"] == {"block1": 0.125} and r["a2a_bytes_per_step"] == {"total": 200, "offrank": 100}
    assert r["loss"] == {"total": 3.0, "id": 2.0, "triplet": 0.5, "aux": 0.01}


def test_flatten_names_every_number_by_its_path():
    flat = flatten({"step": 3, "loss": {"total": 1.5, "id": None}, "expert_load": {"b": [0.25, 0.75]}, "x": "text"})
    assert flat.keys() == {"step", "loss/total", "loss/id", "expert_load/b/0", "expert_load/b/1"}
    assert flat["loss/total"] == 1.5 and np.isnan(flat["loss/id"]) and flat["expert_load/b/1"] == 0.75


def test_keep_until_drops_later_steps_and_a_cut_off_line(tmp_path):
    path = str(tmp_path / METRICS_FILE)
    with open(path, "w") as fh:
        for s in (2, 4, 6):
            fh.write(json.dumps({"step": s}) + "\n")
        fh.write('{"step": 8, "lo')  # a crash mid-write
    assert keep_until(path, 4) == 2 and [r["step"] for r in read_metrics(path)] == [2, 4]
    assert keep_until(str(tmp_path / "none.jsonl"), 4) == 0


def test_resumed_run_continues_jsonl_and_tensorboard_without_duplicates(tmp_path):
    run_dir = str(tmp_path)
    log = RunLog(run_dir, 0)
    for step in (2, 4, 6):
        log.write(_record(step, float(step)))
    log.close()  # the run died after step 6; its last checkpoint is step 4
    log = RunLog(run_dir, 4)
    for step in (6, 8):
        log.write(_record(step, 10.0 + step))  # the resumed steps: other values than the lost ones
    log.close()
    got = read_metrics(f"{run_dir}/{METRICS_FILE}")
    assert [(r["step"], r["loss"]["total"]) for r in got] == [(2, 2.0), (4, 4.0), (6, 16.0), (8, 18.0)]
    acc = EventAccumulator(f"{run_dir}/tensorboard", size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/total")] == [(2, 2.0), (4, 4.0), (6, 16.0), (8, 18.0)]
    assert [i.step for i in acc.Images("expert_load")] == [2, 4, 6, 8]
    # a fresh start (step 0) in the same directory starts both over
    log = RunLog(run_dir, 0)
    log.write(_record(2, 99.0))
    log.close()
    assert [(r["step"], r["loss"]["total"]) for r in read_metrics(f"{run_dir}/{METRICS_FILE}")] == [(2, 99.0)]
    acc = EventAccumulator(f"{run_dir}/tensorboard", size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/total")] == [(2, 99.0)]


def test_nan_loss_is_null_in_json_and_nan_in_tensorboard(tmp_path):
    log = RunLog(str(tmp_path), 0)
    log.write(_record(2, float("nan")))
    log.close()
    assert read_metrics(f"{tmp_path}/{METRICS_FILE}")[0]["loss"]["total"] is None


def test_heatmap_rows_are_layers_columns_experts():
    img = load_heatmap({"block1": [0.25, 0.25, 0.25, 0.25], "block3": [1.0, 0.0]}, cell=3)
    assert img.shape == (2 * 3, 4 * 3, 3) and img.dtype == np.uint8
    even, full, none = img[0, 0], img[3, 0], img[3, 3]
    assert (img[0:3, 0:12] == even).all()  # a balanced layer is one colour
    assert not (even == full).all() and not (even == none).all() and not (full == none).all()
    assert (img[3:6, 6:12] == img[3, 6]).all()  # block3 has 2 experts: padded


def test_wandb_without_the_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    check_wandb("")  # not asked for: fine
    with pytest.raises(ConfigError) as err:
        check_wandb("msmoe")
    msg = str(err.value)
    assert "\n" not in msg and "train.wandb_project='msmoe' needs the wandb package" in msg and "pip install wandb" in msg


def test_wandb_gets_the_same_scalars_when_installed(monkeypatch, tmp_path):
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(
            log=lambda d, step: calls.append(("log", step, d)), finish=lambda: calls.append(("finish",))))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = RunLog(str(tmp_path), 0, wandb_project="p", run_name="tiny", run_id="abc")
    log.write(_record(4, 3.0))
    log.close()
    assert calls[0] == ("init", {"project": "p", "name": "tiny", "id": "abc", "resume": "allow", "config": None})
    assert calls[1][:2] == ("log", 4) and calls[1][2]["loss/total"] == 3.0 and "step" not in calls[1][2]
    assert calls[1][2]["expert_load/block1/3"] == 0.5 and calls[2] == ("finish",)

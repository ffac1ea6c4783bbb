"""``run.json`` deleted or garbled between two parts of a run, then ``--resume``, through the real
command line: the run keeps its id (taken back from its checkpoints, with a warning that says so),
and pruning still holds ``train.keep_last`` over the steps written before."""

import json
import os
import subprocess

import pytest

from tests.helpers import ROOT, TINY_DATA, cli_command, cli_env
from training.checkpoint import store


def _train(tmp, *extra):
    cmd = cli_command("train", "--config", "configs/tiny.yaml", "--no-progress", "name=lost", f"out_dir={tmp}/runs",
                      f"data.path={tmp}/data", f"data.synth={TINY_DATA}", "train.steps=12", "train.ckpt_every=2",
                      "train.keep_last=3", "eval.untrained=false", "eval.missing_modalities=false", *extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_resume_without_a_readable_run_json_keeps_the_run_id_and_prunes_the_old_steps(tmp_path):
    tmp = str(tmp_path)
    run, ckpts = f"{tmp}/runs/lost", f"{tmp}/runs/lost/checkpoints"
    _train(tmp, "--stop-at", "6")
    run_id = json.load(open(f"{run}/run.json"))["run_id"]
    assert [t for _, t, _ in store.list_steps(ckpts)] == ["step0000002", "step0000004", "step0000006"]

    os.remove(f"{run}/run.json")
    proc = _train(tmp, "--resume", "--stop-at", "8")
    assert f"warning: {run}/run.json is missing: continuing run {run_id}, the id recorded in the manifest of " \
           "step0000006" in proc.stderr, proc.stderr[-3000:]
    assert json.load(open(f"{run}/run.json"))["run_id"] == run_id
    assert [t for _, t, _ in store.list_steps(ckpts)] == ["step0000004", "step0000006", "step0000008"]

    open(f"{run}/run.json", "w").write("\x00\x00garbage")
    proc = _train(tmp, "--resume")
    assert f"warning: {run}/run.json is not a run record (JSONDecodeError: " in proc.stderr, proc.stderr[-3000:]
    assert f"continuing run {run_id}, the id recorded in the manifest of step0000008" in proc.stderr
    assert json.load(open(f"{run}/run.json"))["run_id"] == run_id
    assert [t for _, t, _ in store.list_steps(ckpts)] == ["step0000008", "step0000010", "step0000012"]
    assert {store.run_of(ckpts, t) for _, t, _ in store.list_steps(ckpts)} == {run_id}
    aside = [n for n in os.listdir(run) if n.startswith("run.json.unreadable-")]
    assert len(aside) == 1 and open(f"{run}/{aside[0]}").read() == "\x00\x00garbage"

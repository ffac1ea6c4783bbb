"""A ``--resume`` whose config changes the model (training/checkpoint/model_change.py), through the real command line.

Another expert count (another shape) is refused with exit 2 before anything loads, naming the field
old -> new and the commands that keep the trained weights; those commands, run as printed, work. A
top_k change (the same shapes) is refused naming ``--accept-model-change``, which then resumes with
it. A refused resume leaves the run's config.yaml as it was.
"""

import os
import re
import shlex

import pytest

from tests.helpers import TINY_DATA, run_cli


def _train(tmp, *extra, check=False):
    return run_cli("train", "--config", "configs/tiny.yaml", "--no-progress", "name=m", f"out_dir={tmp}/runs",
                   f"data.path={tmp}/data", f"data.synth={TINY_DATA}", "train.steps=4", "train.ckpt_every=2",
                   "eval.untrained=false", "model.patch_moe.router.num_experts=4", *extra, timeout=600, check=check)


def _refused(proc, *phrases):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("msmoe: error:") == 1, proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in proc.stderr, (phrase, proc.stderr[-3000:])
    return proc.stderr


@pytest.mark.slow
def test_a_resume_that_changes_the_model_is_refused_naming_the_fields_and_a_fix_that_works(tmp_path):
    tmp = str(tmp_path)
    _train(tmp, "--stop-at", "2", check=True)
    saved_yaml = f"{tmp}/runs/m/config.yaml"
    saved = open(saved_yaml).read()

    more = ("model.patch_moe.router.num_experts=8", "--resume")
    err = _refused(_train(tmp, *more), "--resume: this config changes the model of run 'm'",
                   "model.patch_moe.router.num_experts 4 -> 8", "The parameter shapes change",
                   f"msmoe convert --src {tmp}/runs/m/checkpoints --out {tmp}/runs/m-experts8 --num-experts 8")
    _refused(_train(tmp, *more, "--accept-model-change"), "--accept-model-change does not help")
    assert open(saved_yaml).read() == saved
    # the fix it names, as printed: convert (weights only), then a new run from the result
    convert, train = re.search(r"(msmoe convert .*?), then (msmoe train .*)$", err.strip()).groups()
    out = run_cli(*shlex.split(convert)[1:], check=True)
    assert "experts [4] -> 8 per layer (upcycle), weights only" in out.stdout
    new = run_cli(*shlex.split(train)[1:], "--stop-at", "1", timeout=600, check=True)
    assert f"initialised 'm-e8' from {tmp}/runs/m-experts8 (saved at step 2)" in new.stdout

    fewer = ("model.patch_moe.router.top_k=1", "--resume", "--stop-at", "3")
    _refused(_train(tmp, *fewer), "model.patch_moe.router.top_k 2 -> 1", "The parameter shapes stay the same",
             "add --accept-model-change to resume with the new values",
             "resume with the saved ones (model.patch_moe.router.top_k=2)")
    assert open(saved_yaml).read() == saved and not os.path.isdir(f"{tmp}/runs/m/checkpoints/step0000003")
    ok = _train(tmp, *fewer, "--accept-model-change", check=True)
    assert "resumed 'm' at step 2" in ok.stdout
    assert "top_k: 1" in open(saved_yaml).read()  # the run goes on with the accepted model, and says so

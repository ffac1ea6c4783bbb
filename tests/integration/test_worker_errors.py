"""A user error raised inside the workers of ``msmoe train --nproc 2``, through the real command line
and a real torchrun: said once, exit code 2, no launcher traceback; a genuine crash still shows it."""

import glob
import os
import subprocess
import tempfile

import pytest

from tests.helpers import ROOT, TINY_DATA, cli_command, cli_env


def _train(tmp, name, *extra, env=None):
    cmd = cli_command("train", "--nproc", "2", "--config", "configs/tiny.yaml", "--no-progress", f"name={name}",
                      f"out_dir={tmp}/runs", f"data.path={tmp}/data", f"data.synth={TINY_DATA}", "train.steps=4",
                      "eval.untrained=false", "eval.missing_modalities=false", *extra)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=cli_env(env, threads=None), timeout=600)


@pytest.mark.slow
def test_a_user_error_in_the_workers_is_said_once_with_exit_code_2(tmp_path):
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "msmoe-worker-errors-*")))
    proc = _train(str(tmp_path), "few", "train.p=30")  # the tiny set has 24 training identities; 30 divides 2
    err = proc.stderr
    assert proc.returncode == 2, proc.stdout[-2000:] + err[-3000:]
    assert err.count("msmoe: error:") == 1 and "identities" in err, err[-3000:]
    # a line of its own, as the run's message (no "[rank 1] " of a worker before it)
    assert "\nmsmoe: error: the training split has 24 identities but train.p=30 per batch; set train.p <= 24" \
        in "\n" + err
    for launcher_noise in ("Traceback", "ChildFailedError", "torch.distributed", "exitcode"):
        assert launcher_noise not in err, err[-3000:]
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "msmoe-worker-errors-*"))) == before  # cleaned up

    # a worker killed outright is no user error: torch's report (first failure: SIGKILL) stays
    crash = _train(str(tmp_path), "crash", env={"MSMOE_FAULT": "kill@1:1"})
    assert crash.returncode == 1, crash.stderr[-3000:]
    assert "ChildFailedError" in crash.stderr and "(SIGKILL)" in crash.stderr
    assert "failed (exitcode: -9)" in crash.stderr  # torch's own log line, held back until then, still shown

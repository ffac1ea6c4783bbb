"""Nothing lost, nothing mixed up: stop signals, run ownership, and errors before anything starts.

Each test reproduces what a user or an operator did (Ctrl-C, the same run started twice, a new run
over an old one, a YAML typo, impossible sizes, an in-place convert) and asserts what they now see:
the exit code, the one message, no process left behind, which checkpoint is the newest.
"""

import contextlib
import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from tests.helpers import ROOT, TINY_DATA, cli_command, cli_env
from training.checkpoint import store


def _args(tmp, name, steps, *extra):
    return ["--config", "configs/tiny.yaml", "--no-progress", f"name={name}", f"out_dir={tmp}/runs",
            f"data.path={tmp}/data", f"data.synth={TINY_DATA}", f"train.steps={steps}", "train.ckpt_every=4",
            "eval.untrained=false", *extra]


def _run(cmd, timeout=600):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=timeout)


def _wait_for(pred, timeout=240, what="it"):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_a_stop_signal_to_msmoe_train_stops_every_process_after_a_checkpoint(tmp_path):
    """SIGTERM here; SIGINT (Ctrl-C) in the next test, on one process."""
    tmp, sig = str(tmp_path), signal.SIGTERM
    ckpts = f"{tmp}/runs/sig/checkpoints"
    cmd = cli_command("train", "--nproc", "2", "train.ep_size=2", *_args(tmp, "sig", 400))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=cli_env(threads=None))
    _wait_for(lambda: store.newest_complete(ckpts) is not None, what="the first checkpoint")
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len(family) >= 3  # torchrun and its two workers
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, out[-3000:]
    name = signal.Signals(sig).name
    assert f"interrupted by {name} after step" in out and "continue with --resume" in out, out[-3000:]
    assert "KeyboardInterrupt" not in out and "ChildFailedError" not in out
    step = int(out.split(f"interrupted by {name} after step ")[1].split(":")[0])
    assert 4 <= step < 400 and store.newest_complete(ckpts) == store.tag_of(step)
    survivors = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert survivors == [], [p.cmdline() for p in survivors]


def _workers(proc) -> dict[int, psutil.Process]:
    """rank -> worker process of a `msmoe train --nproc N` (below its torchrun)."""
    out = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "RANK" in (env := p.environ()) and "launcher.cli" in " ".join(p.cmdline()):
                out[int(env["RANK"])] = p
    return out


@pytest.mark.slow
def test_a_stop_signal_to_one_worker_only_acts_like_one_to_msmoe_train(tmp_path):
    """`kill` of rank 1 alone: both ranks stop after the same step with a checkpoint, rank 0 names the
    signal, and the command exits 143 as for a SIGTERM to itself (was: TypeError, ChildFailedError, 1)."""
    tmp = str(tmp_path)
    ckpts = f"{tmp}/runs/one/checkpoints"
    cmd = cli_command("train", "--nproc", "2", "train.ep_size=2", *_args(tmp, "one", 400))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=cli_env(threads=None))
    _wait_for(lambda: store.newest_complete(ckpts) is not None, what="the first checkpoint")
    _workers(proc)[1].send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, out[-3000:]
    assert "interrupted by SIGTERM after step" in out and "Traceback" not in out, out[-3000:]
    step = int(out.split("interrupted by SIGTERM after step ")[1].split(":")[0])
    assert 4 <= step < 400 and store.newest_complete(ckpts) == store.tag_of(step)


@pytest.mark.slow
def test_ctrl_c_during_the_final_evaluation_completes_the_run_and_exits_0(tmp_path):
    tmp = str(tmp_path)
    run = f"{tmp}/runs/last"
    cmd = cli_command("train", "--nproc", "2", "train.ep_size=2", *_args(tmp, "last", 8))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=cli_env(threads=None))
    # the final checkpoint is committed: what is left is the evaluation (about 2 s here) and the report
    _wait_for(lambda: store.newest_complete(f"{run}/checkpoints") == store.tag_of(8), timeout=300,
              what="the final checkpoint")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGINT arrived after the last step, during the final evaluation: the run is complete" in out, out[-3000:]
    assert "msmoe: SIGINT came as the run was finishing: the workers completed it" in out
    assert "the workers stopped" not in out
    assert open(f"{run}/COMPLETE").read() == "8\n" and json.load(open(f"{run}/summary.json"))["steps"] == 8
    assert os.path.isfile(f"{run}/report.md")


@pytest.mark.slow
def test_the_same_run_started_twice_at_once_refuses_the_second(tmp_path):
    tmp = str(tmp_path)
    first = subprocess.Popen(cli_command("train", *_args(tmp, "twice", 100_000)), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=cli_env())
    _wait_for(lambda: os.path.isfile(f"{tmp}/runs/twice/.lock"), what="the first run's lock")
    second = _run(cli_command("train", *_args(tmp, "twice", 100_000)))
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is being written by PID {first.pid} on " in second.stderr and "Traceback" not in second.stderr
    assert first.poll() is None  # the first run goes on
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 130 and "interrupted by SIGINT after step" in out, out[-3000:]
    assert not os.path.exists(f"{tmp}/runs/twice/.lock")  # released at the end


def test_a_new_run_over_another_runs_checkpoints_needs_resume_or_overwrite(tmp_path):
    tmp = str(tmp_path)
    dead = subprocess.Popen(["true"])  # a run killed before it released its lock
    dead.wait()
    os.makedirs(f"{tmp}/runs/own")
    with open(f"{tmp}/runs/own/.lock", "w") as fh:
        json.dump({"host": os.uname().nodename, "pid": dead.pid, "started": "yesterday"}, fh)
    first = _run(cli_command("train", *_args(tmp, "own", 4)))
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"took over the stale lock of {tmp}/runs/own (PID {dead.pid}" in first.stderr
    old = json.load(open(f"{tmp}/runs/own/run.json"))
    again = _run(cli_command("train", *_args(tmp, "own", 8, "model.patch_moe.expert.hidden_dim=32")))
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"already holds run {old['run_id']}" in again.stderr and "step0000004" in again.stderr
    assert "--resume" in again.stderr and "--overwrite" in again.stderr
    assert store.newest_complete(f"{tmp}/runs/own/checkpoints") == "step0000004"  # untouched
    new = _run(cli_command("train", "--overwrite", *_args(tmp, "own", 8, "model.patch_moe.expert.hidden_dim=32")))
    assert new.returncode == 0, new.stderr[-2000:]
    assert json.load(open(f"{tmp}/runs/own/run.json"))["run_id"] != old["run_id"]
    assert sorted(t for t in os.listdir(f"{tmp}/runs/own/checkpoints") if t.startswith("step")) == \
        ["step0000004", "step0000008"]  # the new run's own (hidden_dim 32: resuming the old ones would fail)
    resumed = _run(cli_command("train", "--resume", *_args(tmp, "own", 8, "model.patch_moe.expert.hidden_dim=32")))
    assert resumed.returncode == 0 and "resumed 'own' at step 8" in resumed.stdout, resumed.stderr[-2000:]


def test_a_yaml_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  steps: 5\n  lr: [1, 2\nmodel: {}\n")
    proc = _run(cli_command("train", "--config", str(bad)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"config '{bad}' is not valid YAML: line 5, column 6: expected ',' or ']'" in proc.stderr, proc.stderr


@pytest.mark.parametrize("extra,expect", [
    (["train.ep_size=4"], "world size 2 is not divisible by train.ep_size=4: choose train.ep_size in [1, 2]"),
    (["train.ep_size=3"], "model.patch_moe.router.num_experts=4 is not divisible by train.ep_size=3"),
    (["train.ep_size=2", "model.patch_moe.router.num_experts=3"],
     "model.patch_moe.router.num_experts=3 is not divisible by train.ep_size=2"),
])
def test_sizes_are_checked_once_before_any_worker_starts(tmp_path, extra, expect):
    proc = _run(cli_command("train", "--nproc", "2", *_args(str(tmp_path), "sizes", 2, *extra)), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("msmoe: error:") == 1 and expect in proc.stderr, proc.stderr[-2000:]
    assert "ChildFailedError" not in proc.stderr and "torch.distributed.run" not in proc.stderr
    assert not os.path.exists(f"{tmp_path}/runs/sizes")  # nothing was started


def test_convert_refuses_to_write_into_its_source(tmp_path):
    src = tmp_path / "runs" / "x" / "checkpoints"
    src.mkdir(parents=True)
    for out in (src, src / "converted"):
        proc = _run(cli_command("convert", "--src", str(src), "--out", str(out), "--ep-size", "1"))
        assert proc.returncode == 2 and "converting in place would mix checkpoints" in proc.stderr, proc.stderr

"""Refused up front, through the real command line: values of the wrong type, ``--nproc 0``, a run
directory that cannot take files, a disk without room for one checkpoint. Each stops with exit
code 2 and one message naming what and how to fix it, before any step is trained."""

import json
import os
import subprocess

import pytest

from tests.helpers import ROOT, TINY_DATA, cli_command, cli_env, unwritable
from training import room
from training.checkpoint import manifest, store


def _args(tmp, name, steps=2, *extra):
    return ["--config", "configs/tiny.yaml", "--no-progress", f"name={name}", f"out_dir={tmp}/runs",
            f"data.path={tmp}/data", f"data.synth={TINY_DATA}", f"train.steps={steps}", "eval.untrained=false",
            "eval.missing_modalities=false", *extra]


def _run(cmd, timeout=600):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=timeout)


@pytest.mark.parametrize("extra, message", [
    (["train.steps=5.7"], "train.steps=5.7 must be an integer (a whole number), not a decimal number"),
    (["train.keep_last=1.5"], "train.keep_last=1.5 must be an integer (a whole number), not a decimal number"),
    (["train.elastic_ep=maybe"], "train.elastic_ep='maybe' must be true or false, not text"),
    (["--nproc", "0"], "--nproc 0: the number of processes on this machine must be >= 1"),
])
def test_a_value_of_the_wrong_type_stops_before_anything_starts(tmp_path, extra, message):
    proc = _run(cli_command("train", *_args(str(tmp_path), "typed", 2, *extra)), timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.count("msmoe: error:") == 1 and f"msmoe: error: {message}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(f"{tmp_path}/runs")  # nothing started, nothing written


def _untouched(run_dir):
    """No step was trained: no metrics, no checkpoint (the run's own run.json may be there)."""
    assert not os.path.exists(f"{run_dir}/metrics.jsonl")
    assert store.list_steps(f"{run_dir}/checkpoints") == []


@pytest.mark.slow
def test_no_room_to_write_a_checkpoint_stops_before_the_first_step(tmp_path):
    tmp = str(tmp_path)
    ckpts = f"{tmp}/runs/ro/checkpoints"
    os.makedirs(ckpts)
    with unwritable(ckpts):
        proc = _run(cli_command("train", *_args(tmp, "ro")))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("msmoe: error:") == 1, proc.stderr
    assert f"msmoe: error: the checkpoint directory {ckpts} is not writable (" in proc.stderr
    assert f"out_dir= (now '{tmp}/runs')" in proc.stderr
    _untouched(f"{tmp}/runs/ro")

    if os.geteuid() == 0:  # a filesystem with less room than one checkpoint: a 512 KiB tmpfs
        small = f"{tmp}/small"
        os.makedirs(small)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", small]).returncode == 0:
            try:
                proc = _run(cli_command("train", *_args(tmp, "full", 2, f"out_dir={small}")))
                assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
                assert "Traceback" not in proc.stderr and proc.stderr.count("msmoe: error:") == 1, proc.stderr
                assert (f"msmoe: error: not enough free disk for one checkpoint in {small}/full/checkpoints: "
                        "about 1.0 MiB needed (53,831 parameters with their Adam state at EP 1, ZeRO 0, fp32), "
                        "0.5 MiB free on its filesystem") in proc.stderr, proc.stderr
                _untouched(f"{small}/full")
            finally:
                subprocess.run(["umount", small], check=True)

    # with room, the same run trains, and its real checkpoint is what the estimate said, give or take framing
    proc = _run(cli_command("train", *_args(tmp, "ro")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    step = f"{ckpts}/{store.newest_complete(ckpts)}"
    written = sum(e["size"] for e in manifest.read(step).files.values())
    estimate = room.checkpoint_bytes(37_063, 16_768, 1, 0, "fp32")  # the tiny model (tests/unit/training/test_room.py)
    assert 0.8 * written <= estimate <= written, (estimate, written)
    assert [n for n in os.listdir(ckpts) if n.startswith(".msmoe-write-check")] == []
    assert json.load(open(f"{tmp}/runs/ro/run.json"))["name"] == "ro"

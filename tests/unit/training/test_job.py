"""What training/job.py wires, in this process (world-1 gloo, the tiny config): a whole run writes
its outputs, --stop-at stops with a checkpoint and --resume finishes it, and the exit codes of a
training that stopped early."""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from training import job
from training.checkpoint import store
from training.config import load_config

from tests.unit.training.tiny_run import TINY_CONFIG, tiny_overrides


@pytest.fixture()
def request_for(tmp_path, world, monkeypatch):
    """TrainRequests of one tiny run in ``tmp_path``; what job.train sets for the process (the
    world's environment, signal handlers, torch threads) is undone after the test."""
    monkeypatch.setenv("MSMOE_REPORT_PLOTS", "0")  # report.md without the plots: faster
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    data = str(tmp_path / "data")

    def make(**kwargs) -> job.TrainRequest:
        overrides = tuple(tiny_overrides(str(tmp_path / "runs"), data, steps=4) + ["eval.missing_modalities=false"])
        return job.TrainRequest(config=TINY_CONFIG, overrides=overrides, progress="off", **kwargs)

    threads = torch.get_num_threads()  # job.train sets train.threads for the process
    yield make
    torch.set_num_threads(threads)
    for s, handler in handlers.items():
        signal.signal(s, handler)


def _run_dir(req: job.TrainRequest) -> str:
    return load_config(req.config, list(req.overrides)).run_dir


def test_a_run_trains_evaluates_and_writes_its_outputs(request_for):
    req = request_for()
    assert job.train(req) == 0
    run_dir = _run_dir(req)
    for name in ("config.yaml", "summary.json", "report.md", "metrics.jsonl", store.COMPLETE):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["steps"] == 4 and len(summary["loss_history"]) == 4 and summary["missing_modality"] is None
    assert summary["world_size"] == 1 and summary["ep_size"] == 1
    assert store.newest_complete(os.path.join(run_dir, store.CKPT_DIR)) == store.tag_of(4)


def test_stop_at_then_resume_finishes_the_run(request_for):
    first = request_for(stop_at=2)
    assert job.train(first) == 0
    run_dir = _run_dir(first)
    ckpt_dir = os.path.join(run_dir, store.CKPT_DIR)
    assert store.newest_complete(ckpt_dir) == store.tag_of(2)
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    assert job.train(request_for(resume=True)) == 0
    assert store.newest_complete(ckpt_dir) == store.tag_of(4)
    with open(os.path.join(run_dir, "summary.json")) as fh:
        assert json.load(fh)["steps"] == 4


def _stopped(**kw):
    trainer = SimpleNamespace(**{"stop_signal": None, "preempted": False, "step": 4, "ckpt_dir": "ck", **kw})
    cfg = SimpleNamespace(train=SimpleNamespace(steps=4))
    return job._stopped_early(cfg, SimpleNamespace(rank=0), trainer)


def test_the_exit_code_of_a_training_that_stopped_early(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert _stopped() is None  # trained to the end: evaluate and report
    assert _stopped(step=2) == 0  # --stop-at: a checkpoint, exit 0
    assert _stopped(preempted=True, stop_signal=15) == 128 + 15  # SIGTERM outside SLURM

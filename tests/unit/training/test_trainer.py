"""The Trainer on one process (world-1 gloo, the tiny config): the loop counts its steps, hands
every step to the metrics processor, saves at the checkpoint interval and at the end, computes
what a plain loop over ``train_step`` computes, and a resume continues at the saved step."""

from __future__ import annotations

import pytest

from training.config import load_config
from training.job import prepare_data
from training.metrics.interval import IntervalStats
from training.trainer import Trainer

from tests.unit.training.tiny_run import TINY_CONFIG, tiny_overrides

STEPS = 6  # logging every 2 steps, a checkpoint every 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, world1):
    path = str(tmp_path_factory.mktemp("data") / "synth")
    cfg = load_config(TINY_CONFIG, tiny_overrides(str(tmp_path_factory.mktemp("runs")), path))
    prepare_data(cfg, world1, progress=False)
    return path


def _trainer(tmp_path, data_dir, world, name="t", **train) -> Trainer:
    cfg = load_config(TINY_CONFIG, tiny_overrides(str(tmp_path), data_dir, **train) + [f"name={name}"])
    return Trainer(cfg, world)


def _spy(obj, name: str, calls: list) -> None:
    """Record the arguments of every call of ``obj.name`` (and still call it)."""
    real = getattr(obj, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    setattr(obj, name, spy)


def test_the_loop_steps_reports_every_step_and_saves_at_the_intervals(tmp_path, data_dir, world):
    trainer = _trainer(tmp_path, data_dir, world)
    done, saved = [], []
    _spy(trainer.metrics, "step_done", done)
    _spy(trainer.checkpointer, "save", saved)
    try:
        trainer.train()
    finally:
        trainer.close()
    assert trainer.step == STEPS and not trainer.preempted
    assert [args[0] for args in done] == list(range(STEPS))  # every step, in order, once
    assert [args[0] for args in saved] == [3, 6]  # the interval, then the end
    h = trainer.metrics.progress.history
    assert len(h.loss) == STEPS and h.load_steps == [2, 4, 6]
    assert trainer.a2a_per_step["calls"] >= 0
    assert trainer.outcome().steps == STEPS


def test_the_loop_computes_what_a_plain_loop_over_train_step_computes(tmp_path, data_dir, world):
    looped = _trainer(tmp_path / "a", data_dir, world, name="a")
    plain = _trainer(tmp_path / "b", data_dir, world, name="b")
    try:
        looped.train()
        plain.engine.train()
        interval = IntervalStats()
        losses = [plain.train_step(s, interval).loss for s in range(STEPS)]
    finally:
        looped.close()
        plain.close()
    assert looped.metrics.progress.history.loss == pytest.approx(losses, rel=1e-6)


def test_a_resume_continues_at_the_saved_step_with_the_same_losses(tmp_path, data_dir, world):
    whole = _trainer(tmp_path / "whole", data_dir, world, name="w")
    first = _trainer(tmp_path / "parts", data_dir, world, name="p")
    try:
        whole.train()
        first.train(stop_at=4)  # a checkpoint at 3 (the interval) and at 4 (the stop)
    finally:
        whole.close()
        first.close()
    assert first.step == 4
    second = _trainer(tmp_path / "parts", data_dir, world, name="p")
    done = []
    _spy(second.metrics, "step_done", done)
    try:
        assert second.resume() == 4
        second.train()
    finally:
        second.close()
    assert [args[0] for args in done] == [4, 5]
    assert second.step == STEPS
    assert second.metrics.progress.history.loss == pytest.approx(whole.metrics.progress.history.loss, rel=1e-5)

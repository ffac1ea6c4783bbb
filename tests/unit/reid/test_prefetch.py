"""Batches made ahead by the prefetch thread (reid/prefetch.py) against the step's batch made
directly, the way the trainer made it before (fetch + a per-sample label lookup): equal, bit for
bit, for a run of steps, a resumed start and a restart; worker errors reach the caller; the thread
stops."""

import threading
import time

import numpy as np
import pytest
import torch

from common.config import ConfigError
from reid.data import PKSampler, fetch, load_splits
from reid.prefetch import BatchFeed, Prefetcher, StepBatches, class_labels
from reid.synth import SynthSpec, ensure_synth
from training.config import TrainConfig

SMALL = SynthSpec(seed=5, num_train_ids=12, num_test_ids=5, num_cameras=3, images_per_camera=3, height=64, width=32)


@pytest.fixture(scope="module")
def train_split(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prefetch") / "data")
    ensure_synth(out, SMALL, progress=False)
    return load_splits(out)["train"]


def _reference(split, sampler, step, dtype=torch.float32):
    """What Trainer.batch computed before prefetching (launcher/trainer.py, up to this change)."""
    train_pids = np.asarray(split["pid"])
    label_of = {int(p): i for i, p in enumerate(np.unique(train_pids))}
    b = fetch(split, sampler.indices(step), sampler.flips(step))
    labels = torch.tensor([label_of[int(p)] for p in b.pid])
    return b, labels.to(torch.int64), dtype


def _assert_same(got, ref):
    b, labels, dtype = ref
    for name in ("rgb", "nir", "tir", "pid", "camid"):
        want = getattr(b, name)
        if name in ("rgb", "nir", "tir"):
            want = want.to(dtype)
        have = getattr(got.batch, name)
        assert have.dtype == want.dtype and torch.equal(have, want), name
    assert got.labels.dtype == torch.int64 and torch.equal(got.labels, labels)


def _alive(name="msmoe-prefetch"):
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


@pytest.mark.parametrize("rank", [0, 1])
def test_prefetched_batches_equal_direct_ones_including_resume(train_split, rank):
    sampler = PKSampler(np.asarray(train_split["pid"]), 4, 3, 2, rank, seed=7)
    feed = BatchFeed(train_split, sampler, torch.device("cpu"), torch.float32, depth=2, end=12)
    try:
        for s in range(0, 5):
            _assert_same(feed.get(s), _reference(train_split, sampler, s))
        feed.close()  # stopped as after --stop-at 5 ...
        assert not _alive()
        for s in range(5, 12):  # ... and resumed: the thread starts again at step 5
            _assert_same(feed.get(s), _reference(train_split, sampler, s))
        _assert_same(feed.get(3), _reference(train_split, sampler, 3))  # any other step: restarted there
        _assert_same(feed.get(4), _reference(train_split, sampler, 4))
    finally:
        feed.close()
    assert not _alive()


def test_bf16_and_no_prefetch_give_the_same_batches(train_split):
    sampler = PKSampler(np.asarray(train_split["pid"]), 4, 2, 1, 0, seed=1)
    off = BatchFeed(train_split, sampler, torch.device("cpu"), torch.bfloat16, depth=0)
    on = BatchFeed(train_split, sampler, torch.device("cpu"), torch.bfloat16, depth=3, end=6)
    try:
        for s in range(6):
            ref = _reference(train_split, sampler, s, torch.bfloat16)
            _assert_same(off.get(s), ref)
            _assert_same(on.get(s), ref)
        on.prefetcher._thread.join(timeout=5)
        assert not on.prefetcher.running  # the thread ends by itself at `end`
    finally:
        on.close()
    assert not _alive()


def test_labels_are_a_vectorised_lookup_of_the_sampler_pids():
    classes = np.array([3, 10, 11, 40])
    assert class_labels(classes, np.array([40, 3, 11, 11, 10])).tolist() == [3, 0, 2, 2, 1]
    with pytest.raises(ValueError, match=r"pid\(s\) \[12, 99\] are not training identities"):
        class_labels(classes, np.array([3, 12, 99]))


def test_a_worker_error_reaches_the_caller_with_its_message_at_its_step():
    made = []

    def make(step):
        if step == 3:
            raise KeyError(f"row {step} is unreadable in shard 7")
        made.append(step)
        return step * 10

    p = Prefetcher(make, depth=2)
    assert [p.get(s) for s in range(3)] == [0, 10, 20]
    with pytest.raises(KeyError, match="row 3 is unreadable in shard 7") as info:
        p.get(3)
    assert any(fr.name == "make" for fr in info.traceback)  # the worker's own traceback
    assert not _alive() and 4 not in made  # the worker stopped at the failing step


def test_the_thread_stops_when_the_loop_raises_or_is_left_early():
    def make(step):
        return torch.full((4,), step)

    with pytest.raises(RuntimeError, match="step 2 went wrong"):
        with Prefetcher(make, depth=2) as p:  # the queue is full and the worker waits on it
            for s in range(10):
                p.get(s)
                if s == 2:
                    time.sleep(0.2)
                    raise RuntimeError("step 2 went wrong")
    assert not _alive()

    slow = Prefetcher(lambda s: time.sleep(0.3) or s, depth=1)
    assert slow.get(0) == 0
    t0 = time.monotonic()
    slow.close()  # waits for the make() in progress, not longer
    assert not _alive() and time.monotonic() - t0 < 2


def test_thread_runs_ahead_of_the_caller():
    calls = []
    p = Prefetcher(lambda s: calls.append(s) or s, depth=3, end=100)
    try:
        assert p.get(0) == 0
        deadline = time.monotonic() + 5
        while len(calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls[:4] == [0, 1, 2, 3] and len(calls) <= 5  # depth 3 queued + one being made
    finally:
        p.close()


def test_step_batches_pin_only_when_asked(train_split):
    sampler = PKSampler(np.asarray(train_split["pid"]), 4, 2, 1, 0, seed=0)
    sb = StepBatches(train_split, sampler)(0)
    assert not sb.batch.rgb.is_pinned()


@pytest.mark.parametrize("value", [-1, 65, "two", 1.5, True])
def test_prefetch_config_is_checked(value):
    with pytest.raises(ConfigError, match=rf"train.prefetch={value!r} must be a whole number of batches in 0..64"):
        TrainConfig(prefetch=value)
    TrainConfig(prefetch=0), TrainConfig(prefetch=4)


def test_on_start_runs_in_every_worker_thread_first():
    seen = []
    p = Prefetcher(lambda s: (threading.current_thread().name, s), depth=1, end=10,
                   on_start=lambda: seen.append(threading.current_thread()))
    try:
        assert p.get(0)[1] == 0
        assert p.get(5)[1] == 5  # restarted: a new thread, set up again
    finally:
        p.close()
    assert len(seen) == 2 and seen[0] is not seen[1] and threading.main_thread() not in seen

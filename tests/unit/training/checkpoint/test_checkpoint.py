"""Checkpoints (training/checkpoint/store.py) by hand, world size 1: complete ones only, pruning of this
run's own steps, the verified choice on resume, and a save that fails (disk full) with a named error."""

import errno
import os
import re
from collections import namedtuple

import pytest

from training.checkpoint import manifest, save_guard, store
from training.checkpoint.verify import verify_dir

from tests.unit.training.checkpoint.markers import write_legacy_marker

NAMES = ("mp_rank_00_model_states.pt", "layer_0_expert_0_mp_rank_00_model_states.pt",
         "expp_rank_0_mp_rank_00_optim_states.pt")


def _commit(ck, step, run_id=None):
    """A step with files and a marker: a manifest with run_id, or a legacy marker (run_id None)."""
    d = os.path.join(ck, store.tag_of(step))
    os.makedirs(d)
    for name in NAMES:
        with open(os.path.join(d, name), "wb") as fh:
            fh.write(os.urandom(2000))
    if run_id is None:
        write_legacy_marker(d, step)
    else:
        manifest.write(d, step, run_id, manifest.entries(d, manifest.list_files(d)))
    return d


def test_checkpoint_selection_ignores_incomplete_and_prunes_this_runs_own(tmp_path):
    ck = str(tmp_path)
    for step, done in ((5, True), (10, True), (15, True), (20, False), (3, False)):
        if done:
            _commit(ck, step, "run-a")
        else:
            os.makedirs(os.path.join(ck, store.tag_of(step)))
    assert store.newest_complete(ck) == "step0000015"
    assert store.incomplete(ck) == ["step0000003", "step0000020"]
    assert sorted(store.prune(ck, 2, "run-a")) == ["step0000003", "step0000005"]
    assert sorted(os.listdir(ck)) == ["step0000010", "step0000015", "step0000020"]  # the newer partial stays


def test_prune_never_removes_another_runs_or_legacy_checkpoints(tmp_path):
    ck = str(tmp_path)
    _commit(ck, 10, None)  # an old run (legacy marker)
    for s in (20, 30, 40):
        _commit(ck, s, "old-run")
    for s in (5, 15, 25):
        _commit(ck, s, "new-run")
    assert store.prune(ck, 1, "new-run") == ["step0000005", "step0000015"]
    assert sorted(os.listdir(ck)) == ["step0000010", "step0000020", "step0000025", "step0000030", "step0000040"]
    assert store.prune(ck, 1, "third-run") == []  # no checkpoint of its own: nothing to prune


def test_resume_choice_skips_a_damaged_step_with_a_warning(tmp_path, capsys):
    ck = str(tmp_path)
    _commit(ck, 5, "r")
    d10 = _commit(ck, 10, "r")
    os.truncate(os.path.join(d10, NAMES[1]), 100)
    assert store.choose_verified(ck, "tiny") == "step0000005"
    out = capsys.readouterr().out
    assert (f"warning: checkpoint step0000010 (step 10) in {ck}: {NAMES[1]}: size 100 != 2000 in the manifest"
            in out)
    assert ("resuming from step0000005 (step 5), the newest verified checkpoint, instead of step0000010 (step 10)"
            in out)


def test_resume_choice_uses_a_legacy_marker_unverified(tmp_path, capsys):
    ck = str(tmp_path)
    _commit(ck, 5, None)
    assert store.choose_verified(ck, "tiny") == "step0000005"
    assert "step0000005 has an old COMMITTED marker" in capsys.readouterr().out


def test_resume_with_no_verified_step_names_every_step_tried(tmp_path):
    ck = str(tmp_path)
    for s in (5, 10):
        os.remove(os.path.join(_commit(ck, s, "r"), NAMES[0]))
    with pytest.raises(store.CheckpointUnverified) as info:
        store.choose_verified(ck, "tiny")
    msg = str(info.value)
    assert "step0000010: 1 problem(s), first: mp_rank_00_model_states.pt: missing" in msg
    assert "step0000005: 1 problem(s)" in msg and "msmoe checkpoints verify" in msg
    assert isinstance(info.value, FileNotFoundError)  # exit 2 through the command line's user errors


# ---- save(): a fake engine that writes through a DeepSpeed-like checkpoint engine

class _Writer:
    """DeepSpeed's checkpoint_engine: ``save(state_dict, path)``; raises ``fail`` for paths containing ``on``."""

    def __init__(self, fail=None, on=""):
        self.fail, self.on, self.written = fail, on, []

    def save(self, state_dict, path):
        if self.fail is not None and self.on in path:
            with open(path, "wb") as fh:
                fh.write(b"partial")
            raise self.fail
        with open(path, "wb") as fh:
            fh.write(os.urandom(3000))
        self.written.append(os.path.basename(path))


class _Engine:
    def __init__(self, writer):
        self.checkpoint_engine = writer
        self.after_write = []  # what DeepSpeed does after its writes (its last barrier): must still run

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        for name in NAMES:
            self.checkpoint_engine.save({}, os.path.join(save_dir, tag, name))
        self.after_write.append(tag)


def test_save_writes_a_manifest_then_latest(tmp_path):
    ck = str(tmp_path)
    tag = store.save(_Engine(_Writer()), ck, 10, {"step": 10}, 3, 0, 1, run_id="run-x")
    m = manifest.read(os.path.join(ck, tag))
    assert m.run_id == "run-x" and m.step == 10 and sorted(m.files) == sorted(NAMES)
    assert open(os.path.join(ck, "latest")).read() == "step0000010"


@pytest.mark.parametrize("fail", ["enospc", "iostream"])
def test_disk_full_during_save_is_named_and_the_previous_step_stays_newest(tmp_path, monkeypatch, fail):
    ck = str(tmp_path)
    store.save(_Engine(_Writer()), ck, 5, {"step": 5}, 3, 0, 1, run_id="r")
    if fail == "enospc":
        exc = OSError(errno.ENOSPC, "No space left on device")
    else:  # what torch.save raises on a full disk; the free space tells the cause
        exc = RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\nbasic_ios::clear: "
                           "iostream error")
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(save_guard.shutil, "disk_usage", lambda p: usage(3 << 20, (3 << 20) - 4096, 4096))
    engine = _Engine(_Writer(fail=exc, on="layer_0"))
    with pytest.raises(save_guard.CheckpointWriteError) as info:
        store.save(engine, ck, 10, {"step": 10}, 3, 0, 1, run_id="r")
    msg = str(info.value)
    path = re.escape(os.path.join(ck, "step0000010.partial-")) + "[0-9a-f]+" + re.escape(f"/{NAMES[1]}")
    assert re.search(f"rank 0: {path}: No space left on device \\(", msg) and "bytes free on its filesystem" in msg, msg
    assert f"step0000005 is still the newest complete checkpoint in {ck}" in msg
    if fail == "iostream":
        assert "(4096 bytes free on its filesystem)" in msg
    assert [t[:19] for t in engine.after_write] == ["step0000010.partial"]  # DeepSpeed's save ran to its end
    assert engine.checkpoint_engine.written == [NAMES[0]]  # later writes of the lost step skipped
    # the failed save's own directory is removed (it frees the space); nothing else is touched
    assert store.newest_complete(ck) == "step0000005" and store.incomplete(ck) == []
    assert open(os.path.join(ck, "latest")).read() == "step0000005"
    assert isinstance(info.value, OSError)


def test_a_failed_manifest_write_leaves_the_step_incomplete(tmp_path, monkeypatch):
    ck = str(tmp_path)
    store.save(_Engine(_Writer()), ck, 5, {"step": 5}, 3, 0, 1, run_id="r")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifest, "write", full)
    with pytest.raises(save_guard.CheckpointWriteError, match=r"COMMITTED: No space left on device"):
        store.save(_Engine(_Writer()), ck, 10, {"step": 10}, 3, 0, 1, run_id="r")
    assert store.newest_complete(ck) == "step0000005"


def test_a_failed_save_of_a_committed_step_leaves_that_step_as_it_was(tmp_path):
    ck = str(tmp_path)
    store.save(_Engine(_Writer()), ck, 5, {"step": 5}, 3, 0, 1, run_id="r")
    before = manifest.read(os.path.join(ck, "step0000005")).files
    with pytest.raises(save_guard.CheckpointWriteError, match="step0000005 is still the newest complete"):
        store.save(_Engine(_Writer(fail=OSError(errno.EIO, "Input/output error"), on="expp")), ck, 5,
                        {"step": 5}, 3, 0, 1, run_id="r")
    assert store.newest_complete(ck) == "step0000005" and verify_dir(ck)[1] == 0  # never written into
    assert manifest.read(os.path.join(ck, "step0000005")).files == before
    assert sorted(os.listdir(ck)) == ["latest", "step0000005"]  # the failed save's directory is gone

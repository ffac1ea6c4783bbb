"""Run ownership (training/ownership.py) by hand: identity, refusal, overwrite, the lock's states (a stale
holder process: tests/integration/test_ownership.py)."""

import os

import pytest

from training import ownership
from training.checkpoint import store


def _commit(run_dir, step):
    tag = os.path.join(run_dir, store.CKPT_DIR, store.tag_of(step))
    os.makedirs(tag)
    open(os.path.join(tag, store.MARKER), "w").write(f"{step}\n")


def test_identity_kept_on_resume_new_on_overwrite(tmp_path):
    run = str(tmp_path / "r")
    first = ownership.claim(run, "r", resume=False, overwrite=False)
    _commit(run, 5)
    open(os.path.join(run, "summary.json"), "w").write("{}")
    assert ownership.claim(run, "r", resume=True, overwrite=False) == first
    with pytest.raises(ownership.RunOwnershipError, match=rf"already holds run {first.run_id} .* up to step0000005"):
        ownership.check_start(run, resume=False, overwrite=False)
    ownership.check_start(run, resume=True, overwrite=False)
    second = ownership.claim(run, "r", resume=False, overwrite=True)
    assert second.run_id != first.run_id
    assert not os.path.exists(os.path.join(run, store.CKPT_DIR)) and not os.path.exists(f"{run}/summary.json")
    ownership.check_start(run, resume=False, overwrite=False)  # nothing left to protect


def _commit_manifest(run_dir, step, run_id):
    """A complete step whose manifest records ``run_id`` (as training/checkpoint/store.py writes them)."""
    from training.checkpoint import manifest

    tag = os.path.join(run_dir, store.CKPT_DIR, store.tag_of(step))
    os.makedirs(tag)
    open(os.path.join(tag, "mp_rank_00_model_states.pt"), "wb").write(os.urandom(100))
    manifest.write(tag, step, run_id, manifest.entries(tag, manifest.list_files(tag)))


def _steps(run_dir):
    return [t for _, t, _ in store.list_steps(os.path.join(run_dir, store.CKPT_DIR))]


@pytest.mark.parametrize("damage, problem", [
    (None, "is missing"),
    ("{not json", "is not a run record (JSONDecodeError: "),
    ('{"run_id": "x"}', "is not a run record (TypeError: "),
])
def test_a_lost_run_json_is_recovered_from_the_checkpoints_on_resume(tmp_path, capsys, damage, problem):
    run = str(tmp_path / "r")
    first = ownership.claim(run, "r", resume=False, overwrite=False)
    for step in (2, 4, 6, 8, 10):  # a run pruned to keep_last=3 would hold 3; 5 are the bug's leftovers
        _commit_manifest(run, step, first.run_id)
    os.remove(os.path.join(run, ownership.RUN_FILE))
    if damage is not None:
        open(os.path.join(run, ownership.RUN_FILE), "w").write(damage)
    got = ownership.claim(run, "r", resume=True, overwrite=False)
    assert got.run_id == first.run_id and got.name == "r"
    assert ownership.read_identity(run) == got  # written again
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {run}/run.json {problem}") and err.count("warning:") == 1, err
    assert f"continuing run {first.run_id}, the id recorded in the manifest of step0000010" in err
    if damage is not None:  # the garbled file is kept, not deleted
        aside = [n for n in os.listdir(run) if n.startswith("run.json.unreadable-")]
        assert len(aside) == 1 and open(os.path.join(run, aside[0])).read() == damage and aside[0] in err
    # the next commit's prune holds keep_last again over the run's old steps
    assert store.prune(os.path.join(run, store.CKPT_DIR), 3, got.run_id) == ["step0000002", "step0000004"]
    assert _steps(run) == ["step0000006", "step0000008", "step0000010"]


def test_without_a_recorded_id_the_old_steps_are_kept_and_said_to_be(tmp_path, capsys):
    run = str(tmp_path / "r")
    _commit(run, 5)  # old markers: a step number, no run id
    _commit(run, 10)
    got = ownership.claim(run, "r", resume=True, overwrite=False)
    err = capsys.readouterr().err
    assert f"warning: {run}/run.json is missing: no checkpoint records a run id (old markers), so this is a new " \
           f"run {got.run_id}; the existing steps ['step0000005', 'step0000010'] are not known to be its own and " \
           "are never pruned" in err
    assert store.prune(os.path.join(run, store.CKPT_DIR), 1, got.run_id) == []
    assert _steps(run) == ["step0000005", "step0000010"]
    ownership.claim(str(tmp_path / "empty"), "e", resume=True, overwrite=False)  # nothing to resume: no warning
    assert capsys.readouterr().err == ""

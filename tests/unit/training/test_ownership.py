"""Run ownership (training/ownership.py) by hand: identity, refusal, overwrite, the lock's states."""

import json
import os
import subprocess

import pytest

from training import checkpoint, ownership


def _commit(run_dir, step):
    tag = os.path.join(run_dir, checkpoint.CKPT_DIR, checkpoint.tag_of(step))
    os.makedirs(tag)
    open(os.path.join(tag, checkpoint.MARKER), "w").write(f"{step}\n")


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
    assert not os.path.exists(os.path.join(run, checkpoint.CKPT_DIR)) and not os.path.exists(f"{run}/summary.json")
    ownership.check_start(run, resume=False, overwrite=False)  # nothing left to protect


def test_lock_busy_stale_and_released(tmp_path, monkeypatch):
    run = str(tmp_path / "r")
    mine = ownership.RunLock(run)
    assert mine.acquire() is None
    with pytest.raises(ownership.RunOwnershipError, match=f"is being written by PID {os.getpid()}"):
        ownership.RunLock(run).acquire()
    with pytest.raises(ownership.RunOwnershipError):
        ownership.check_unlocked(run)
    mine.release()
    assert not os.path.exists(os.path.join(run, ownership.LOCK_FILE))

    dead = subprocess.Popen(["true"])
    dead.wait()
    holder = {"host": os.uname().nodename, "pid": dead.pid, "started": "then"}
    open(os.path.join(run, ownership.LOCK_FILE), "w").write(json.dumps(holder))
    ownership.check_unlocked(run)  # a dead holder does not block
    note = ownership.RunLock(run).acquire()
    assert f"stale lock of {run} (PID {dead.pid}" in note

    elsewhere = {"host": "another-node", "pid": 1, "started": "then", "slurm_job": "77"}
    open(os.path.join(run, ownership.LOCK_FILE), "w").write(json.dumps(elsewhere))
    with pytest.raises(ownership.RunOwnershipError, match="on another-node"):
        ownership.check_unlocked(run)  # cannot be checked from here: taken as busy
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    ownership.check_unlocked(run)  # ... unless it is this SLURM job's earlier incarnation (requeued)

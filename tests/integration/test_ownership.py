"""The run lock (training/ownership.py) with a real, finished process as the stale holder."""

import json
import os
import subprocess

import pytest

from training import ownership


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

"""Preemption: SIGUSR1 (SLURM's warning, ``--signal=USR1@T``) or SIGTERM sets a flag that rides on
the trainer's per-step all-reduce, so every rank stops after the same step; rank 0 then requeues
the SLURM job, which resumes from the checkpoint (``--auto-resume``)."""

from __future__ import annotations

import os
import signal
import subprocess


PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    """Remembers the first SIGUSR1/SIGTERM; install it as early as possible in a worker."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> "Preemption":
        def handler(signum, frame):
            if self.signal is None:
                self.signal = signum
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, handler)
        return self


def requeue(rank: int) -> str | None:
    """Under SLURM, put this job back in the queue (rank 0 only). Returns what happened."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID") and \
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" or os.environ.get("SLURM_JOB_ID")
    if rank != 0 or not job:
        return None
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"scontrol requeue {job} failed: {proc.stderr.strip()}"
    return f"requeued SLURM job {job}"

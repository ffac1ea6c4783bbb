"""Stopping on a signal, without losing a step.

SIGUSR1 (SLURM's warning, ``--signal=USR1@T``), SIGTERM (SLURM's preemption, ``kill``) and SIGINT
(Ctrl-C; ``msmoe train --nproc N`` forwards it through torchrun) set a flag that rides on the
trainer's per-step all-reduce, so every rank stops after the same step and saves a checkpoint.
Then under SLURM rank 0 requeues the job, which resumes from the checkpoint (``--auto-resume``);
elsewhere the run exits with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), the
shell's convention for "interrupted", and says how to continue. A second SIGINT gives up waiting
for the step to end (KeyboardInterrupt, as without this handler).
"""

from __future__ import annotations

import os
import signal
import subprocess

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def interrupted_exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum``: 128 + its number."""
    return 128 + int(signum)


class Preemption:
    """Remembers the first stop signal; install it as early as possible in a worker."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> "Preemption":
        def handler(signum, frame):
            if self.signal is None:
                self.signal = signum
            elif signum == signal.SIGINT:  # Ctrl-C twice: stop waiting for the step
                raise KeyboardInterrupt
        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)
        return self

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""


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


def under_slurm() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))

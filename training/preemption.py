"""Stopping on a signal, without losing a step.

SIGUSR1 (SLURM's warning, ``--signal=USR1@T``), SIGTERM (SLURM's preemption, ``kill``) and SIGINT
(Ctrl-C; ``msmoe train --nproc N`` forwards it through torchrun) set a flag that rides on the
trainer's per-step all-reduce, so every rank stops after the same step and saves a checkpoint.
A signal may reach one rank only (``kill`` of one worker): each rank contributes one flag per stop
signal (:func:`signal_flags`) and all read the same agreed signal from the sums
(:func:`agreed_signal`), so every rank reports the same signal and exits with the same code.
Then under SLURM rank 0 requeues the job, which resumes from the checkpoint (``--auto-resume``);
elsewhere the run exits with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), the
shell's convention for "interrupted", and says how to continue. A second SIGINT gives up waiting
for the step to end (KeyboardInterrupt, as without this handler).
"""

from __future__ import annotations

import os
import signal
import subprocess

# in the order of precedence when ranks received different ones: a person's Ctrl-C, then a kill
# (or SLURM's preemption), then SLURM's warning
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def interrupted_exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum``: 128 + its number."""
    return 128 + int(signum)


def signal_flags(signum: int | None) -> list[float]:
    """This rank's part of the agreement: 1.0 for the stop signal it received, one slot per STOP_SIGNALS."""
    return [1.0 if signum == sig else 0.0 for sig in STOP_SIGNALS]


def agreed_signal(summed_flags) -> int | None:
    """The stop signal every rank acts on, from :func:`signal_flags` summed over the ranks (or from
    one rank's flags): the first of STOP_SIGNALS that some rank received; None if none did."""
    return next((int(sig) for sig, n in zip(STOP_SIGNALS, summed_flags) if n > 0), None)


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else ""


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
        return signal_name(self.signal)


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

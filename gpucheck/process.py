"""A section's process, ended whole when it overruns (used by gpucheck/check.py and gpucheck/suite.py)."""

from __future__ import annotations

import os
import signal
import subprocess


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> int:
    """Exit code, or 124 after killing the process *and its children* (a training run, torchrun's
    workers) when it overruns: nothing of a section may hold the GPU while the next one runs."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the section was started in a session of its own
        except ProcessLookupError:
            pass
        proc.wait()
        return 124

"""Run a launcher (torchrun) as this command's child, so that nothing outlives the command.

The child runs in its own session: a Ctrl-C in the terminal reaches only this process, which
forwards SIGINT / SIGTERM to the child exactly once per signal received (torchrun passes it on to
its workers: they stop after the same step and checkpoint, training/preemption.py) and waits for
it. Should this process die anyway (SIGKILL), the kernel sends the child SIGTERM (Linux
PR_SET_PDEATHSIG), and torchrun stops its workers in turn.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
from dataclasses import dataclass

FORWARDED = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildExit:
    code: int  # the child's exit status
    signal: int | None  # the first signal this process received and forwarded, if any


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux/glibc: the child outlives a SIGKILLed parent, as any child would
        pass


def run_child(cmd: list[str], env: dict) -> ChildExit:
    received: list[int] = []
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)

    def forward(signum, frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return ChildExit(code, received[0] if received else None)

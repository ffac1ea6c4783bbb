"""How the workers of ``msmoe train --nproc N`` tell the command how they ended, past torchrun.

torchrun knows one outcome for its whole group: 0, or, as soon as one worker exits non-zero (143
after a SIGTERM, too), a ChildFailedError traceback and exit code 1. So the launching command
(launcher/train.py) hands its workers a folder (``MSMOE_WORKER_EXITS``); each worker writes its exit
code there (``rank<R>``) on its way out (launcher/cli.py) and, when the code is one the whole group
agrees on (0, or 128 + a stop signal: every rank stopped after the same step, training/preemption.py),
exits 0 to torchrun. Other codes (an error) reach torchrun unchanged, so that it stops the other
workers at once. The command then exits with the code its workers agreed on (:func:`outcome`):
143 when a SIGTERM reached one worker only, as when it reached the command; 0 when the run
completed although Ctrl-C came during its final evaluation.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from typing import Iterator

from common.files import write_text_atomic
from training.preemption import STOP_SIGNALS, interrupted_exit_code

ENV = "MSMOE_WORKER_EXITS"
GROUP_CODES = frozenset({0, *(interrupted_exit_code(s) for s in STOP_SIGNALS)})  # agreed by every rank


def report(code: int, environ=None) -> int:
    """A worker ends with ``code``: note it for the launching command; returns the status to exit with."""
    env = os.environ if environ is None else environ
    folder, rank = env.get(ENV), env.get("RANK")
    if not folder or rank is None or not os.path.isdir(folder):
        return code
    try:
        write_text_atomic(os.path.join(folder, f"rank{int(rank)}"), f"{code}\n")
    except (OSError, ValueError):
        return code
    return 0 if code in GROUP_CODES else code


@contextlib.contextmanager
def exits_folder() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="msmoe-worker-exits-") as folder:
        yield folder


def read(folder: str) -> dict[int, int]:
    """rank -> the exit code it noted."""
    out = {}
    for name in os.listdir(folder):
        if name.startswith("rank") and name[4:].isdigit():
            with contextlib.suppress(OSError, ValueError):
                out[int(name[4:])] = int(open(os.path.join(folder, name)).read().strip())
    return out


def outcome(codes: dict[int, int], nproc: int, received: int | None, launcher_code: int) -> tuple[int, str | None]:
    """The command's exit code and a closing line, from the workers' noted codes, the signal this
    command received and forwarded (if any) and torchrun's own exit code."""
    agreed = set(codes.values()) if len(codes) == nproc else set()
    name = signal.Signals(received).name if received is not None else None
    if len(agreed) == 1 and (code := agreed.pop()) in GROUP_CODES:
        if code == 0 and name:
            return 0, f"msmoe: {name} came as the run was finishing: the workers completed it (see above); exit 0"
        if code and name:
            return code, f"msmoe: {name}: the workers stopped (see above for the checkpoint); exit {code}"
        return code, None
    if received is not None:
        return interrupted_exit_code(received), (f"msmoe: {name}: the workers stopped (see above for the checkpoint); "
                                                 f"exit {interrupted_exit_code(received)}")
    return launcher_code, None

"""What every worker script here shares: joining the process group, and writing this rank's results
as <out>/rank<r>.json, the file tests/helpers.py's runners collect (one per rank).

Workers are run by path (python tests/dist/<script>.py under a launcher), so their own folder is
first on sys.path: ``from harness import finish, init_world, write_result`` (a worker that returns calls
``finish()`` last).
"""

import json
import os

from parallel.dist import WorldInfo, init_distributed, leave_distributed


def init_world(backend: str | None = None, timeout_s: float = 300.0) -> WorldInfo:
    """Join (or create) the process group the way msmoe's trainer does (parallel/dist.py)."""
    return init_distributed(backend=backend, timeout_s=timeout_s)


def write_result(out: str, rank: int, report: dict, indent: int | None = None) -> str:
    """Write ``report`` to <out>/rank<rank>.json at once (written beside it, then renamed: a rank
    waiting for another's file never reads half of it); returns the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"rank{rank}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(report, fh, indent=indent)
    os.replace(path + ".tmp", path)
    return path


def finish() -> None:
    """End a worker that returned normally the way msmoe's commands end (parallel/dist.leave_distributed):
    ranks meet, the group is destroyed, the process exits at once. Through the interpreter's own shutdown
    a rank sometimes aborted in a C++ destructor after its work was done ("terminate called without an
    active exception", SIGABRT: seen once in CI under accelerate launch), failing a passing run."""
    leave_distributed(0)

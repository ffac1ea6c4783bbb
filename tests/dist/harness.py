"""What every worker script here shares: joining the process group, and writing this rank's results
as <out>/rank<r>.json, the file tests/helpers.py's runners collect (one per rank).

Workers are run by path (python tests/dist/<script>.py under a launcher), so their own folder is
first on sys.path: ``from harness import init_world, write_result``.
"""

import json
import os

from parallel.dist import WorldInfo, init_distributed


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

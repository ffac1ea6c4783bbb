"""Python-object collectives that are plain no-ops at world size 1 (no process group needed).

Checkpoint code uses them to agree across ranks: rank 0 decides and broadcasts (:func:`from_rank0`),
every rank contributes (:func:`gathered`), or every rank learns the first error (:func:`first_error`,
which also serves as a barrier). Each goes through ``parallel.all_to_all.collective``: a rank that
died meanwhile (killed during a save) makes the others fail with the named CollectiveError
(``collective '<what>' failed on rank R: another rank died ...``, exit code 2), not gloo's raw error.
"""

from __future__ import annotations

import torch.distributed as dist

from parallel.all_to_all import collective


def from_rank0(value, world_size: int, what: str = "checkpoint decision"):
    """Rank 0's ``value`` on every rank."""
    if world_size == 1:
        return value
    box = [value]
    collective(f"broadcast of rank 0's {what}", dist.broadcast_object_list, box, src=0)
    return box[0]


def gathered(value, world_size: int, what: str = "checkpoint share") -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if world_size == 1:
        return [value]
    out = [None] * world_size
    collective(f"all-gather of every rank's {what}", dist.all_gather_object, out, value)
    return out


def first_error(error: str | None, world_size: int, what: str = "checkpoint outcome") -> str | None:
    """Every rank's error (or None) in; the first one out, the same on every rank."""
    return next((e for e in gathered(error, world_size, what) if e), None)

"""Python-object collectives that are plain no-ops at world size 1 (no process group needed).

Checkpoint code uses them to agree across ranks: rank 0 decides and broadcasts (:func:`from_rank0`),
every rank contributes (:func:`gathered`), or every rank learns the first error (:func:`first_error`,
which also serves as a barrier).
"""

from __future__ import annotations

import torch.distributed as dist


def from_rank0(value, world_size: int):
    """Rank 0's ``value`` on every rank."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(value, world_size: int) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if world_size == 1:
        return [value]
    out = [None] * world_size
    dist.all_gather_object(out, value)
    return out


def first_error(error: str | None, world_size: int) -> str | None:
    """Every rank's error (or None) in; the first one out, the same on every rank."""
    return next((e for e in gathered(error, world_size) if e), None)

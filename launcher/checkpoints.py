"""Atomic, pruned checkpoints of a run on top of DeepSpeed's ``save_checkpoint``.

Layout (``runs/<name>/checkpoints/``)
  step0000020/            DeepSpeed's files (model, one file per global expert, optimizer per rank)
  step0000020/COMMITTED   written by rank 0 after every rank finished writing: the checkpoint is complete
  latest                  name of the newest committed checkpoint (written to a temp file, then renamed)

A crash anywhere before COMMITTED leaves a directory without it: :func:`newest_complete` ignores
such directories (and ``latest`` is only moved after the commit), so ``--resume`` and elastic
restarts continue from the previous complete checkpoint. After each commit all but the newest
``keep_last`` complete checkpoints, and the incomplete leftovers older than the newest, are deleted.
"""

from __future__ import annotations

import os
import re
import shutil

import torch.distributed as dist

from launcher import faults

MARKER = "COMMITTED"


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model the config builds (another shape)."""


_TAG = re.compile(r"^step(\d{7,})$")


def tag_of(step: int) -> str:
    return f"step{step:07d}"


def _tags(ckpt_dir: str) -> list[tuple[int, str, bool]]:
    """(step, tag, complete) of every checkpoint directory, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = _TAG.match(name)
        if m and os.path.isdir(os.path.join(ckpt_dir, name)):
            out.append((int(m.group(1)), name, os.path.isfile(os.path.join(ckpt_dir, name, MARKER))))
    return sorted(out)


def newest_complete(ckpt_dir: str) -> str | None:
    done = [tag for _, tag, complete in _tags(ckpt_dir) if complete]
    return done[-1] if done else None


def incomplete(ckpt_dir: str) -> list[str]:
    return [tag for _, tag, complete in _tags(ckpt_dir) if not complete]


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(engine, ckpt_dir: str, step: int, client: dict, keep_last: int, rank: int, world_size: int) -> str:
    """Write, commit and prune; every rank calls it. Returns the tag."""
    tag = tag_of(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client, save_latest=False)
    faults.maybe("kill_in_save", step, rank)  # fault injection: files written, not yet committed
    if world_size > 1:
        dist.barrier()  # every rank's files are on disk
    if rank == 0:
        _write_atomic(os.path.join(ckpt_dir, tag, MARKER), f"{step}\n")
        _write_atomic(os.path.join(ckpt_dir, "latest"), tag)
        prune(ckpt_dir, keep_last)
    if world_size > 1:
        dist.barrier()
    return tag


def mark_complete(ckpt_dir: str, tag: str) -> None:
    """Commit a checkpoint written in one piece by another tool (e.g. ``msmoe convert``)."""
    m = _TAG.match(tag)
    _write_atomic(os.path.join(ckpt_dir, tag, MARKER), f"{int(m.group(1)) if m else 0}\n")
    _write_atomic(os.path.join(ckpt_dir, "latest"), tag)


def prune(ckpt_dir: str, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and incomplete ones older
    than the newest complete one. Returns the deleted tags."""
    tags = _tags(ckpt_dir)
    done = [(s, t) for s, t, c in tags if c]
    if not done:
        return []
    newest_step = done[-1][0]
    doomed = [t for _, t in done[:-keep_last]] + [t for s, t, c in tags if not c and s < newest_step]
    for t in doomed:
        shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)
    return doomed

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

from parallel.files import write_text_atomic
from training.faults import NO_FAULTS, FaultPlan

CKPT_DIR = "checkpoints"  # inside the run directory
MARKER = "COMMITTED"  # inside a checkpoint: every rank's files are written
COMPLETE = "COMPLETE"  # inside the run directory: the run finished and reported (job scripts read it)


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


def save(engine, ckpt_dir: str, step: int, client: dict, keep_last: int, rank: int, world_size: int,
         faults: FaultPlan = NO_FAULTS) -> str:
    """Write, commit and prune; every rank calls it. Returns the tag."""
    tag = tag_of(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client, save_latest=False)
    faults.process_fault("kill_in_save", step, rank)  # files written, not yet committed
    if world_size > 1:
        dist.barrier()  # every rank's files are on disk
    if rank == 0:
        write_text_atomic(os.path.join(ckpt_dir, tag, MARKER), f"{step}\n")
        write_text_atomic(os.path.join(ckpt_dir, "latest"), tag)
        prune(ckpt_dir, keep_last)
    if world_size > 1:
        dist.barrier()
    return tag


def mark_complete(ckpt_dir: str, tag: str) -> None:
    """Commit a checkpoint written in one piece by another tool (e.g. ``msmoe convert``)."""
    m = _TAG.match(tag)
    write_text_atomic(os.path.join(ckpt_dir, tag, MARKER), f"{int(m.group(1)) if m else 0}\n")
    write_text_atomic(os.path.join(ckpt_dir, "latest"), tag)


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


def load(engine, ckpt_dir: str, config_name: str, **kwargs) -> tuple[str | None, dict | None]:
    """DeepSpeed's ``load_checkpoint``, with a clear error for a checkpoint of another model shape."""
    try:
        return engine.load_checkpoint(ckpt_dir, **kwargs)
    except RuntimeError as exc:
        text = str(exc)
        if "size mismatch" in text or "Missing key" in text or "Unexpected key" in text:
            first = next((ln.strip() for ln in text.splitlines() if "size mismatch" in ln or "key" in ln), "")
            raise CheckpointMismatch(
                f"the checkpoint in {ckpt_dir} was saved by a model of another shape than config "
                f"{config_name!r} builds ({first[:200]}); train with the config it was saved with "
                f"(its run directory holds config.yaml), or change the expert count with `msmoe convert`"
            ) from None
        raise


def resume(engine, ckpt_dir: str, config_name: str, prepare=None) -> dict:
    """Load the newest *complete* checkpoint (weights, optimizer); returns its client state.

    ``prepare(ckpt_dir, tag) -> load_dir``, if given, runs on every rank once the tag is chosen and
    says where DeepSpeed loads it from (training/elastic.py: a copy resharded to this run's EP size)."""
    tag = newest_complete(ckpt_dir)
    if tag is None:
        partial = incomplete(ckpt_dir)
        raise FileNotFoundError(f"--resume: no complete checkpoint in {ckpt_dir}"
                                + (f" (incomplete, ignored: {partial})" if partial else "")
                                + f"; run without --resume to start {config_name!r} from scratch")
    load_dir = ckpt_dir if prepare is None else prepare(ckpt_dir, tag)  # elastic EP: maybe a resharded copy
    path, client = load(engine, load_dir, config_name, tag=tag)
    if path is None:
        raise RuntimeError(f"--resume: DeepSpeed could not load {tag} in {load_dir}")
    return client


def load_weights(engine, ckpt_dir: str, config_name: str) -> int:
    """Weights only (no optimizer state), e.g. a checkpoint converted to another expert count.
    Returns the step it was saved at (0 if unknown)."""
    if not os.path.isfile(os.path.join(ckpt_dir, "latest")):
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (no 'latest' file)")
    path, client = load(engine, ckpt_dir, config_name, load_module_only=True, load_optimizer_states=False,
                        load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the weights in {ckpt_dir}")
    return int((client or {}).get("step", 0))

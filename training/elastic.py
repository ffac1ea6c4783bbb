"""Elastic expert parallelism: ``--resume`` at another EP size (or world size) than the checkpoint's.

What a checkpoint's layout allows (P = EP size, W = world size, see parallel/reshard.py):
  ZeRO 0, same P, any W     loads as it is: weights are stored per global expert, the optimizer per
                            EP rank, and every replica of an EP rank reads the same file
  ZeRO 0, another P         resharded on load: rank 0 writes a copy for the run's P (the experts'
                            Adam moments moved to their new owners, as ``msmoe convert --ep-size``
                            does offline) to ``<ckpt_dir>/.elastic/ep<P>/<tag>``, every rank waits
                            for it, and DeepSpeed loads from there. A complete copy is reused (a
                            second restart at the same size); copies of other tags are deleted then.
  ZeRO 1/2, another P or W  refused before loading, naming both layouts and the fix: DeepSpeed
                            partitions the optimizer state over the ranks (zero_pp_rank_<r> files)
                            and cannot move it to other partitions.

The checkpoint directory must be shared by all ranks (as for saving). All ranks read the layout
from the same files and decide alike; rank 0's result (or error) is
broadcast, so a failed reshard stops every rank with the same message instead of a hang.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.reshard import ReshardError, reshard_checkpoint, source_ep_size

STAGING = ".elastic"  # inside the checkpoint directory; hidden, so pruning and tag listing skip it
MODEL_FILE = "mp_rank_00_model_states.pt"
ZERO_FILES = "*zero_pp_rank_*_mp_rank_00_optim_states.pt"


class ElasticError(ReshardError):
    """A checkpoint that cannot be loaded at this run's EP / world size (a user error: msmoe exits 2)."""


@dataclass(frozen=True)
class Layout:
    """How a checkpoint was saved, or how this run is laid out."""

    ep_size: int
    world_size: int
    zero_stage: int

    def __str__(self) -> str:
        return f"EP={self.ep_size} on {self.world_size} rank(s), ZeRO stage {self.zero_stage}"


def _load_small(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # not a zip-format file: mmap is not possible
        return torch.load(path, map_location="cpu", weights_only=False)


def saved_layout(tag_dir: str) -> Layout:
    """EP size, world size and ZeRO stage of the checkpoint in ``tag_dir``.

    ZeRO 0: the optimizer files, one per EP rank (also right after ``msmoe convert``). ZeRO 1/2:
    msmoe's client state (``ep_size``, ``world_size``: training/trainer.py ``save``), else, for older
    checkpoints, the expert group's name ``ep_size_<P>`` in the ZeRO partition of rank 0."""
    model = _load_small(os.path.join(tag_dir, MODEL_FILE))
    zero = int(((model.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    world = int(model.get("world_size") or model.get("dp_world_size") or 1)
    ep = model.get("ep_size")
    if zero == 0:
        ep = source_ep_size(tag_dir)
    elif ep is None:
        files = sorted(glob.glob(os.path.join(tag_dir, ZERO_FILES)))
        if not files:
            raise ElasticError(f"{tag_dir}: ZeRO stage {zero} checkpoint without zero_pp_rank_*_optim_states.pt files")
        opt = _load_small(files[0])["optimizer_state_dict"]["base_optimizer_state"]
        names = [g.get("name", "") for g in opt["param_groups"] if g.get("moe")]
        sizes = [int(m.group(1)) for m in (re.fullmatch(r"ep_size_(\d+)", n) for n in names) if m]
        ep = max(sizes) if sizes else 1
    return Layout(int(ep), world, zero)


def staged_path(ckpt_dir: str, ep_size: int) -> str:
    """The load directory of the copies resharded for ``ep_size`` (a copy of tag T is ``<it>/T``)."""
    return os.path.join(ckpt_dir, STAGING, f"ep{ep_size}")


def refusal(tag: str, ckpt_dir: str, saved: Layout, run: Layout) -> str | None:
    """Why ``saved`` cannot be loaded by ``run`` (None: it can, resharded or not)."""
    if saved.zero_stage == 0 and run.zero_stage == 0:
        return None
    if (saved.ep_size, saved.world_size) == (run.ep_size, run.world_size):
        return None
    return (f"--resume: checkpoint {tag} in {ckpt_dir} was saved at {saved}; this run is {run}. ZeRO stage 1/2 "
            f"partitions the optimizer state over the ranks and cannot be moved to another EP or world size. "
            f"Resume at the saved size (train.ep_size={saved.ep_size}, --nproc {saved.world_size}), or train with "
            f"train.zero_stage=0: its checkpoints reshard automatically on --resume (offline: msmoe convert --ep-size)")


class ElasticResume:
    """``prepare(ckpt_dir, tag) -> load_dir`` for training/checkpoint.py's ``resume``; every rank calls it.

    ``note`` says what was done ("resharded EP 4 -> 2"), for the resume message; None if nothing."""

    def __init__(self, run: Layout, rank: int):
        self.run, self.rank = run, rank
        self.note: str | None = None

    def prepare(self, ckpt_dir: str, tag: str) -> str:
        saved = saved_layout(os.path.join(ckpt_dir, tag))
        problem = refusal(tag, ckpt_dir, saved, self.run)
        if problem is not None:
            raise ElasticError(problem)
        if saved.ep_size == self.run.ep_size:
            return ckpt_dir
        load_dir = staged_path(ckpt_dir, self.run.ep_size)
        error = None
        if self.rank == 0:
            try:
                self._write(ckpt_dir, tag, load_dir)
            except (ReshardError, OSError) as exc:
                error = f"--resume: resharding {tag} in {ckpt_dir} from EP {saved.ep_size} to {self.run.ep_size} " \
                        f"failed: {exc}"
        if self.run.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)  # also the barrier: the copy is complete for everyone
            error = box[0]
        if error is not None:
            raise ElasticError(error)
        self.note = f"resharded EP {saved.ep_size} -> {self.run.ep_size}"
        return load_dir

    def _write(self, ckpt_dir: str, tag: str, load_dir: str) -> None:
        staging = os.path.join(ckpt_dir, STAGING)
        for stale in glob.glob(os.path.join(staging, "ep*", "*")):  # copies of older tags, other sizes
            if os.path.join(load_dir, tag) != stale:
                shutil.rmtree(stale, ignore_errors=True)
        if _same_file(os.path.join(ckpt_dir, tag, MODEL_FILE), os.path.join(load_dir, tag, MODEL_FILE)):
            return  # complete (reshard_checkpoint writes it in one piece) and of this very checkpoint: reuse it
        reshard_checkpoint(ckpt_dir, tag, load_dir, self.run.ep_size)


def _same_file(src: str, copy: str) -> bool:
    """``copy`` was copied from ``src`` as it is now (shutil.copy2 keeps the modification time)."""
    try:
        a, b = os.stat(src), os.stat(copy)
    except FileNotFoundError:
        return False
    return (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)

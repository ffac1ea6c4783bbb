"""Elastic expert parallelism: ``--resume`` at another EP size (or world size) than the checkpoint's.

What a checkpoint's layout allows (P = EP size, W = world size, see parallel/reshard.py):
  ZeRO 0, same P, any W     loads as it is: weights are stored per global expert, the optimizer per
                            EP rank, and every replica of an EP rank reads the same file
  ZeRO 0, another P         resharded on load: rank 0 writes a copy for the run's P (the experts'
                            Adam moments moved to their new owners, as ``msmoe convert --ep-size``
                            does offline) to ``<ckpt_dir>/.elastic/ep<P>/<tag>``, every rank waits
                            for it, and DeepSpeed loads from there. A complete copy is reused (a
                            second restart at the same size); copies of other tags are deleted then.
  ZeRO 1/2, same P and W    loads as it is (DeepSpeed's own zero_pp_rank_<r> files)
  ZeRO 1/2, another P or W  DeepSpeed partitions the optimizer state over the ranks and cannot move it
  (or another ZeRO stage)   (its universal checkpoint does not cover MoE): rank 0 writes a ZeRO 0 copy
                            at this run's P as above (parallel/zero_state.py rebuilds the per-EP-rank
                            state from the partitions first). A ZeRO 0 run loads it as it is; a ZeRO
                            1/2 run loads the weights, then its own partitions of every parameter's
                            Adam moments from the copy (parallel/zero_load.py). A ZeRO 0 checkpoint
                            at this P goes into a ZeRO 1/2 run the same way, without a copy.
                            bf16/fp16 ZeRO 1/2 checkpoints (fp32 master weights in the partitions)
                            are refused before loading, naming both layouts and the fixes.

The checkpoint directory must be shared by all ranks (as for saving). All ranks read the layout
from the same files and decide alike; rank 0's result (or error) is
broadcast, so a failed reshard stops every rank with the same message instead of a hang.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import torch
import torch.distributed as dist

from parallel.ds_names import OPTIM_FILE
from parallel.reshard import ReshardError, optimizer_of, reshard_checkpoint, source_ep_size
from parallel.zero_load import load_plain_optimizer_state
from parallel.zero_state import ZeroStateError, low_precision_of
from training.checkpoint import store
from training.checkpoint.layout import Layout

STAGING = ".elastic"  # inside the checkpoint directory; hidden, so pruning and tag listing skip it
MODEL_FILE = "mp_rank_00_model_states.pt"
ZERO_FILES = "*zero_pp_rank_*_mp_rank_00_optim_states.pt"
SOURCE = "SOURCE"  # in a copy: size and mtime of the model file it was made from (a complete copy is reused)


class ElasticError(ReshardError):
    """A checkpoint that cannot be loaded at this run's EP / world size (a user error: msmoe exits 2)."""


def _load_small(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # not a zip-format file: mmap is not possible
        return torch.load(path, map_location="cpu", weights_only=False)


def saved_layout(tag_dir: str) -> Layout:
    """EP size, world size and ZeRO stage of the checkpoint in ``tag_dir``.

    ZeRO 0: the optimizer files, one per EP rank (also right after ``msmoe convert``). ZeRO 1/2:
    msmoe's client state (``ep_size``, ``world_size``: training/checkpoint/checkpointer.py ``save``), else, for older
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


def refusal(tag: str, ckpt_dir: str, saved: Layout, run: Layout, low_precision: str | None = None) -> str | None:
    """Why ``saved`` cannot be loaded by ``run`` (None: it can, resharded or not). ``low_precision``:
    "bf16"/"fp16" when the checkpoint was trained so."""
    if saved == run or saved.zero_stage == 0 or low_precision is None:
        return None
    return (f"--resume: checkpoint {tag} in {ckpt_dir} was saved at {saved} with {low_precision} weights; this run is "
            f"{run}. A {low_precision} ZeRO 1/2 checkpoint keeps its fp32 master weights in the partitioned optimizer "
            f"state, which msmoe moves to another layout for fp32 runs only. Resume at the saved layout "
            f"(train.ep_size={saved.ep_size} train.zero_stage={saved.zero_stage}, --nproc {saved.world_size}), or start "
            f"a new run from its weights: --init-from {ckpt_dir} name=<new name> (the optimizer state restarts)")


class ElasticResume:
    """``prepare(ckpt_dir, tag) -> load_dir`` and ``load(engine, load_dir, config_name, tag)`` for
    training/checkpoint/store.py's ``resume``; every rank calls both.

    ``note`` says what was done ("resharded EP 4 -> 2"), for the resume message; None if nothing."""

    def __init__(self, run: Layout, rank: int):
        self.run, self.rank = run, rank
        self.note: str | None = None
        self.into_partitions = False  # load: weights, then the optimizer state into this run's ZeRO partitions

    def prepare(self, ckpt_dir: str, tag: str) -> str:
        tag_dir = os.path.join(ckpt_dir, tag)
        saved = saved_layout(tag_dir)
        problem = refusal(tag, ckpt_dir, saved, self.run, low_precision_of(_load_small(os.path.join(tag_dir, MODEL_FILE))))
        if problem is not None:
            raise ElasticError(problem)
        run = self.run
        if saved == run or (saved.zero_stage == run.zero_stage == 0 and saved.ep_size == run.ep_size):
            return ckpt_dir  # DeepSpeed loads it as it is
        self.into_partitions = run.zero_stage > 0
        if saved.zero_stage == 0 and saved.ep_size == run.ep_size:
            load_dir = ckpt_dir  # already one plain optimizer file per EP rank of this run
        else:
            load_dir = self._copy(ckpt_dir, tag, saved)
        both_zero0 = saved.zero_stage == run.zero_stage == 0
        self.note = (f"resharded EP {saved.ep_size} -> {run.ep_size}" if both_zero0
                     else f"optimizer state moved from {saved} to {run}")
        return load_dir

    def load(self, engine, load_dir: str, config_name: str, tag: str):
        """DeepSpeed's load; into a ZeRO 1/2 run from a plain (ZeRO 0) checkpoint: the weights, then this
        rank's partitions of the optimizer state from its EP rank's file. Returns (path, client state)."""
        if not self.into_partitions:
            return store.load(engine, load_dir, config_name, tag=tag)
        path, client = store.load(engine, load_dir, config_name, tag=tag, load_module_only=True,
                                       load_optimizer_states=False, load_lr_scheduler_states=False)
        if path is None:
            return path, client
        source = os.path.join(load_dir, tag, OPTIM_FILE.format(self.rank % self.run.ep_size))  # EP groups: consecutive ranks
        try:
            plain = optimizer_of(torch.load(source, map_location="cpu", weights_only=False), source)
            load_plain_optimizer_state(engine, plain, source)
        except (ReshardError, ZeroStateError) as exc:
            raise ElasticError(f"--resume: the optimizer state of {tag} cannot go into this run ({self.run}): {exc}; "
                               f"resume at the saved size, or start a new run from its weights with --init-from "
                               f"{load_dir} name=<new name>") from None
        for key in ("global_steps", "global_samples"):  # what DeepSpeed restores with the optimizer
            if key in client:
                setattr(engine, key, client[key])
        return path, client

    def _copy(self, ckpt_dir: str, tag: str, saved: Layout) -> str:
        """Rank 0 writes (or reuses) the ZeRO 0 copy at this run's EP size; all ranks wait for it."""
        load_dir = staged_path(ckpt_dir, self.run.ep_size)
        error = None
        if self.rank == 0:
            try:
                self._write(ckpt_dir, tag, load_dir)
            except (ReshardError, OSError) as exc:
                error = f"--resume: resharding {tag} in {ckpt_dir} from {saved} to {self.run} failed: {exc}"
        if self.run.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)  # also the barrier: the copy is complete for everyone
            error = box[0]
        if error is not None:
            raise ElasticError(error)
        return load_dir

    def _write(self, ckpt_dir: str, tag: str, load_dir: str) -> None:
        staging = os.path.join(ckpt_dir, STAGING)
        for stale in glob.glob(os.path.join(staging, "ep*", "*")):  # copies of older tags, other sizes
            if os.path.join(load_dir, tag) != stale:
                shutil.rmtree(stale, ignore_errors=True)
        source = _stamp(os.path.join(ckpt_dir, tag, MODEL_FILE))
        marker = os.path.join(load_dir, tag, SOURCE)
        if os.path.isfile(marker) and open(marker).read() == source:
            return  # complete (reshard_checkpoint writes it in one piece) and of this very checkpoint: reuse it
        reshard_checkpoint(ckpt_dir, tag, load_dir, self.run.ep_size)
        with open(marker, "w") as fh:
            fh.write(source)


def _stamp(path: str) -> str:
    """Size and modification time of ``path``: which file a copy was made from."""
    st = os.stat(path)
    return f"{st.st_size} {st.st_mtime_ns}\n"

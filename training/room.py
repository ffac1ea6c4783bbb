"""Room to write a run, checked before the first step: the run directory and ``checkpoints/`` must
be writable (msmoe train --nproc N checks it once in the launching process, every worker again),
and the checkpoints' filesystem must have room for one checkpoint of this model (every rank, once
the model is built and loaded, when a step is left to train: a resume with none writes no checkpoint). Either refusal is a CheckpointWriteError (exit code 2) naming the path, the
cause and the fix; nothing is created or trained first.

One checkpoint, in bytes (DeepSpeed's MoE layout, training/checkpoint/store.py; P = every parameter once,
L = one rank's parameters: the dense ones and 1/EP of the experts; Adam keeps two fp32 moments,
8 bytes per parameter, and with bf16 also a 4-byte fp32 master copy):

  weights     P x 4 (fp32) or P x 2 (bf16)
  ZeRO 0      + L x 8 (12) x (EP + 1): an optimizer file per EP rank, and rank 0's model file holds its
              optimizer state once more
  ZeRO 1, 2   + P x 8 (12): the optimizer state partitioned over the ranks

The tiny config (53,831 parameters, EP 1) comes to 1.08 MB against 1.22 MB written: the pickle
framing of many small tensors is not counted, so the estimate is a floor, close for real models.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from training.checkpoint.save_guard import CheckpointWriteError

ADAM_BYTES = 8  # two fp32 moments per parameter
MASTER_BYTES = 4  # bf16 training: DeepSpeed keeps an fp32 copy of every parameter in the optimizer


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def write_problem(path: str) -> str | None:
    """Why msmoe could not write files into the directory ``path`` (creating it if missing); None
    if it can. An existing directory is tried with a real file (created and removed at once); for a
    missing one the nearest existing parent must be a writable directory. Creates nothing else."""
    found = _nearest_existing(path)
    if found != os.path.abspath(path):
        if not os.path.isdir(found):
            return f"cannot be created: {found} is not a directory"
        if not os.access(found, os.W_OK | os.X_OK):
            return f"cannot be created: its parent {found} is not writable"
        return None
    if not os.path.isdir(path):
        return "is not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".msmoe-write-check-", dir=path)
    except OSError as exc:
        return f"is not writable ({exc.strerror or exc})"
    os.close(fd)
    os.remove(probe)
    return None


def check_writable(run_dir: str, ckpt_dir: str, out_dir: str) -> None:
    """The run directory and its ``checkpoints/`` can take files, else CheckpointWriteError."""
    elsewhere = f"or train elsewhere with out_dir= (now {out_dir!r}) or name="
    for what, path in (("the run directory", run_dir), ("the checkpoint directory", ckpt_dir)):
        problem = write_problem(path)
        if problem:
            raise CheckpointWriteError(
                f"{what} {path} {problem}: msmoe writes the run's checkpoints and results there; make it writable "
                f"(e.g. `chmod u+w {_nearest_existing(path)}`), {elsewhere}")


def checkpoint_bytes(dense: int, experts: int, ep_size: int, zero_stage: int, precision: str) -> int:
    """About the bytes of one checkpoint of a model of ``dense`` + ``experts`` parameters (every
    expert once) at this EP size, ZeRO stage and precision (see the module docstring)."""
    params = dense + experts
    local = dense + experts // ep_size
    per_param = ADAM_BYTES + (MASTER_BYTES if precision == "bf16" else 0)
    weights = params * (2 if precision == "bf16" else 4)
    optimizer = local * per_param * (ep_size + 1) if zero_stage == 0 else params * per_param
    return weights + optimizer


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def room_problem(ckpt_dir: str, need: int, what: str, out_dir: str) -> str | None:
    """Why one checkpoint of ``need`` bytes (``what``: how that was estimated) does not fit on the
    filesystem of ``ckpt_dir``; None when it does."""
    free = shutil.disk_usage(_nearest_existing(ckpt_dir)).free
    if free >= need:
        return None
    return (f"not enough free disk for one checkpoint in {ckpt_dir}: about {_mib(need)} needed ({what}), "
            f"{_mib(free)} free on its filesystem; free some space, or train elsewhere with out_dir= (now "
            f"{out_dir!r})")


def check_room(trainer) -> None:
    """Every rank, once the model is built: one checkpoint fits where it will be written. All ranks
    agree (one collective) and raise the same CheckpointWriteError."""
    from training.collect import first_error
    from training.report.model_cost import parameter_counts

    tc, ep = trainer.cfg.train, trainer.groups.ep_size
    counts = parameter_counts(trainer.model, [layer.deepspeed_moe for layer in trainer.moe_layers], ep)
    need = checkpoint_bytes(counts["dense"], counts["experts"], ep, tc.zero_stage, tc.precision)
    what = (f"{counts['total']:,} parameters with their Adam state at EP {ep}, ZeRO {tc.zero_stage}, "
            f"{tc.precision}")
    problem = first_error(room_problem(trainer.ckpt_dir, need, what, trainer.cfg.out_dir), trainer.world_size)
    if problem:
        raise CheckpointWriteError(problem)

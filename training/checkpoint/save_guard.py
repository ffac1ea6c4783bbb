"""A checkpoint write that fails (disk full, quota, I/O error) without tearing the ranks apart.

DeepSpeed's ``save_checkpoint`` runs collectives around its file writes (a barrier before, the tag
check, a barrier after). A rank whose ``torch.save`` raised mid-way would skip the last barrier and
leave the others waiting in it, and the user would read ``basic_ios::clear: iostream error``.
:func:`recorded_writes` catches each failed write through DeepSpeed's checkpoint engine, records it
and lets the save go on, so every rank runs the same collectives; the caller then agrees on the
outcome with the other ranks (training/checkpoint/store.py) and raises :class:`CheckpointWriteError` on
every rank, with the path, the cause and the free bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Iterator

from common.errors import UserError

LOW_SPACE = 1 << 20  # bytes: below this the filesystem is reported as full


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written; the previous complete one is still the newest."""


@contextlib.contextmanager
def recorded_writes(engine) -> Iterator[list[tuple[str, BaseException]]]:
    """``with recorded_writes(engine) as failed: engine.save_checkpoint(...)``: failed file writes
    land in ``failed`` as (path, exception) instead of raising inside DeepSpeed; after the first
    failure the step is lost, so later writes of this rank are skipped."""
    failed: list[tuple[str, BaseException]] = []
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        yield failed
        return
    original = ce.save

    def save(state_dict, path):
        if failed:
            return None
        try:
            return original(state_dict, path)
        except (OSError, RuntimeError) as exc:  # torch.save on a full disk: RuntimeError (iostream error)
            failed.append((path, exc))
            return None

    ce.save = save
    try:
        yield failed
    finally:
        ce.save = original


def _free_bytes(path: str) -> int | None:
    while path and not os.path.isdir(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


def _is_enospc(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe(path: str, exc: BaseException) -> str:
    """'PATH: CAUSE (N bytes free)': the cause is "No space left on device" when the error says
    so (ENOSPC, EDQUOT) or the filesystem has less than 1 MiB left."""
    free = _free_bytes(path)
    if _is_enospc(exc) or (free is not None and free < LOW_SPACE):
        cause = "No space left on device"
    else:
        cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    room = f"{free} bytes free on its filesystem" if free is not None else "free space unknown"
    return f"{path}: {cause} ({room})"


def write_error(error: str, step: int, tag: str, ckpt_dir: str, previous: str | None) -> CheckpointWriteError:
    """The one message every rank raises: what failed, and which checkpoint a resume would use."""
    still = (f"{previous} is still the newest complete checkpoint" if previous
             else "there is no complete checkpoint yet")
    return CheckpointWriteError(f"checkpoint at step {step} could not be written ({error}); {tag} was not "
                                f"committed and its unfinished directory is removed; {still} in {ckpt_dir}")

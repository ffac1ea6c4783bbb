"""Atomic writes: a reader sees the old content or the new, never a half-written file or folder.

``atomic_file`` yields a temp file beside the target (same folder, so the rename cannot cross
filesystems) and, when the block ends without an error, flushes, fsyncs and renames it into place;
when anything fails (a full disk: ENOSPC) the temp file is removed and the error names the
target, so a failed write leaves the old file (or none), never a half or 0-byte one.
``write_text_atomic`` writes a small file (a marker, a ``latest`` pointer, summary.json) through it.
``staged_dir`` yields a ``<dst>.partial`` folder to fill and renames it to
``dst`` only when the block ends without an error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO]:
    """``with atomic_file(path, "wb") as fh: fh.write(...)``: ``path`` holds all of it or is unchanged.
    An OSError raised on the way (open, write, flush, fsync, rename) carries ``path`` as its filename."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")  # the rename itself survives a power cut
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.filename in (None, tmp):
            exc.filename = path
        raise


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    with atomic_file(path) as fh:
        fh.write(text)


@contextlib.contextmanager
def staged_dir(dst: str) -> Iterator[str]:
    """``with staged_dir(dst) as tmp: <write files into tmp>``: dst appears complete or not at all."""
    tmp = dst.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)

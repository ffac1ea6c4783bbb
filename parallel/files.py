"""Atomic writes: a reader sees the old content or the new, never a half-written file or folder.

``write_text_atomic`` writes a small file (a marker, a ``latest`` pointer) through a temp file,
fsync and rename. ``staged_dir`` yields a ``<dst>.partial`` folder to fill and renames it to
``dst`` only when the block ends without an error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator


def write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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

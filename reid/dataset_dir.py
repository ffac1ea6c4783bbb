"""Where a dataset is written: msmoe replaces only what it made, one writer at a time.

A dataset directory is msmoe's when it holds ``msmoe_data.json`` and nothing but what msmoe writes
there (``arrow/``). Any other non-empty folder is refused with a :class:`~reid.data.DataError`
naming it, and left untouched; an empty or missing one is written.

Writers of one directory ``D`` take an flock on ``.<D's name>.msmoe-lock`` beside it (the kernel
releases it when the holder dies, so a killed writer never leaves anyone waiting), build the new
set in a fresh ``.<D's name>.msmoe-tmp-<pid>-<hex>`` beside it (marked inside by ``MSMOE_TMP``) and
rename it into place: a reader finds the old set or the new one, never a part. A second writer
waits for the first, then sees its set (``write_dataset(..., reuse=True)`` keeps it). Leftovers of
a killed writer are removed by the next one, which holds the lock, so nobody else is writing them:
only directories whose name has that pattern and whose content is msmoe's (the marker, or nothing
but a dataset's own files).

  with writer_lock(out_dir):                 # waits for another writer of out_dir
      check_replaceable(out_dir, "data.path")
      clear_leftovers(out_dir)
      tmp = new_temp_dir(out_dir)
      ...                                    # write the set into tmp
      publish(tmp, out_dir, "data.path")
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import socket
import sys
from typing import Callable, Iterator

from reid.data import META_FILE, DataError

TMP_MARKER = "MSMOE_TMP"  # inside a temp dir msmoe is writing
LAYOUT = frozenset({"arrow", META_FILE})  # what a finished dataset directory holds


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _beside(out_dir: str, suffix: str) -> str:
    out_dir = os.path.realpath(out_dir)
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.{suffix}")


def lock_path(out_dir: str) -> str:
    return _beside(out_dir, "msmoe-lock")


def _listing(names: list[str], folder: str, limit: int = 5) -> str:
    shown = [n + ("/" if os.path.isdir(os.path.join(folder, n)) else "") for n in sorted(names)[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def check_replaceable(out_dir: str, field: str = "data.path") -> None:
    """Raise DataError unless ``out_dir`` is missing, empty, or a dataset msmoe wrote (only its files).

    ``field`` names the setting the path came from (``data.path``, ``--out``) in the message."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise DataError(f"{field}={out_dir!r} is a file, not a dataset folder: msmoe will not replace it; "
                        f"set {field} to a new or empty folder")
    names = os.listdir(out_dir)
    foreign = [n for n in names if n not in LAYOUT]
    if not names or (META_FILE in names and not foreign):
        return
    if META_FILE in names:
        what = f"holds {META_FILE} but also {_listing(foreign, out_dir)}, which msmoe did not write"
    else:
        what = f"holds {_listing(names, out_dir)} and no {META_FILE}: it is not a dataset msmoe made"
    raise DataError(f"{field}={out_dir!r} {what}; msmoe neither deletes nor writes into a folder it did not make. "
                    f"Set {field} to a new or empty folder, or move those files away")


@contextlib.contextmanager
def writer_lock(out_dir: str, say: Callable[[str], None] = _stderr) -> Iterator[None]:
    """Hold the write lock of ``out_dir`` (waiting, with one message, while another process holds it)."""
    path = lock_path(out_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            say(f"msmoe: waiting for {holder}, which is writing the dataset {out_dir} (lock {path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _temp_pattern(out_dir: str) -> re.Pattern:
    return re.compile(re.escape(os.path.basename(_beside(out_dir, "msmoe-tmp-"))) + r"\d+-[0-9a-f]{12}")


def _temp_name(out_dir: str) -> str:
    return _beside(out_dir, f"msmoe-tmp-{os.getpid()}-{secrets.token_hex(6)}")


def new_temp_dir(out_dir: str) -> str:
    """A fresh, marked temp dir beside ``out_dir`` (call it holding :func:`writer_lock`)."""
    tmp = _temp_name(out_dir)
    os.mkdir(tmp)
    open(os.path.join(tmp, TMP_MARKER), "w").close()
    return tmp


def _is_leftover(path: str, pattern: re.Pattern) -> bool:
    if not pattern.fullmatch(os.path.basename(path)) or os.path.islink(path) or not os.path.isdir(path):
        return False
    names = set(os.listdir(path))
    return TMP_MARKER in names or names <= LAYOUT


def clear_leftovers(out_dir: str, say: Callable[[str], None] = _stderr) -> list[str]:
    """Remove the temp dirs a killed writer of ``out_dir`` left (hold :func:`writer_lock`); returns them."""
    parent = os.path.dirname(os.path.realpath(out_dir))
    if not os.path.isdir(parent):
        return []
    pattern = _temp_pattern(out_dir)
    gone = []
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if _is_leftover(path, pattern):
            shutil.rmtree(path)
            gone.append(path)
    if gone:
        say(f"msmoe: removed {len(gone)} unfinished dataset write(s) beside {out_dir}, left by a stopped process")
    return gone


def publish(tmp: str, out_dir: str, field: str = "data.path") -> None:
    """Put the finished set in ``tmp`` at ``out_dir`` (hold :func:`writer_lock`); an msmoe dataset
    there is swapped out, then removed. ``out_dir`` is checked again first: nothing foreign is lost."""
    try:
        check_replaceable(out_dir, field)
    except DataError:
        shutil.rmtree(tmp)
        raise
    os.remove(os.path.join(tmp, TMP_MARKER))  # a kill from here on leaves a dataset-only temp dir: still ours
    target = os.path.realpath(out_dir)
    if os.path.isdir(target) and os.listdir(target):  # msmoe's own set (checked above)
        old = _temp_name(out_dir)
        os.rename(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:  # missing, or an empty folder: rename replaces an empty directory
        os.replace(tmp, target)

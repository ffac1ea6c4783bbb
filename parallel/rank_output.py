"""Every line a non-zero rank writes starts with ``[rank N] ``, so a job's merged output says who
spoke (rank 0 writes plain lines: it is the one that reports).

  prefix_rank_output(launcher_rank())   at start-up, before DeepSpeed is imported (torchrun & co. set RANK)
  prefix_rank_output(world.rank)        after joining the group (mpirun: the rank comes from MPI)

Covers what Python writes through sys.stdout / sys.stderr: print, warnings, tracebacks, and the
logging handlers already attached to those streams (DeepSpeed's logger). Output written by C++
directly to the file descriptors (gloo, NCCL) is not prefixed.
"""

from __future__ import annotations

import logging
import os
import sys


class PrefixedStream:
    """A text stream that writes ``prefix`` at the start of every line to ``inner``."""

    def __init__(self, inner, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix
        self._at_line_start = True

    def write(self, text: str) -> int:
        if not text:
            return 0
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_line_start:
                out.append(self.prefix)
            out.append(piece)
            self._at_line_start = piece.endswith(("\n", "\r"))
        self.inner.write("".join(out))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.inner.flush()

    def isatty(self) -> bool:
        return self.inner.isatty()

    def __getattr__(self, name: str):  # encoding, fileno, errors, buffer ... of the real stream
        return getattr(self.inner, name)


def launcher_rank() -> int:
    """The rank a launcher put in the environment (RANK), 0 if none did yet."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def prefix_rank_output(rank: int) -> None:
    """From now on this process's stdout and stderr lines start with ``[rank N] `` (rank > 0; rank 0
    unchanged). Idempotent."""
    if rank == 0:
        return
    prefix = f"[rank {rank}] "
    swapped = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, PrefixedStream) or stream is None:
            continue
        wrapped = PrefixedStream(stream, prefix)
        swapped[id(stream)] = wrapped
        setattr(sys, name, wrapped)
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and id(h.stream) in swapped:
                h.setStream(swapped[id(h.stream)])

"""User errors raised inside the workers of ``msmoe train --nproc N`` (and ``eval``): said once, exit 2.

Every rank usually meets the same bad setting (too few identities for ``train.p``, ``train.p`` not
dividing the ranks, a disk without room): printed by each worker, then by torchrun as a
``ChildFailedError`` traceback, the user read it N times and got exit code 1. Instead:

  msmoe (launcher/train.py)  makes a fresh directory and names it in ``MSMOE_WORKER_ERRORS``
  a worker (launcher/cli.py) writes its user error's message to ``rank<R>.txt`` there instead of
                             printing it, and exits 2 as it would on its own
  torchrun                   runs as ``python -m launcher.worker_errors`` (torch's own entry point,
                             wrapped): when its workers fail, it prints every distinct message once
                             (``[rank R] `` before one that rank 0 did not report), then exits 2 with
                             no traceback if the first worker to fail reported a user error; a genuine
                             crash (any other exit, a signal) still shows torch's report, traceback and
                             log lines, after the messages

Run by hand under a plain ``torchrun``, nothing changes: each worker prints its message as before.
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "MSMOE_WORKER_ERRORS"
USER_ERROR_EXIT = 2  # what launcher/cli.py returns for a user error
TORCH_PROCESS_LOG = "torch.distributed.elastic.multiprocessing.api"  # "failed (exitcode: 2) ...", "Sending ... SIGTERM"


def report(message: str) -> bool:
    """In a worker of msmoe's own launch: leave ``message`` for the launcher to say; False when
    this process is no such worker (or the file cannot be written: then the caller prints it)."""
    folder, rank = os.environ.get(ENV), os.environ.get("RANK")
    if not folder or rank is None:
        return False
    path = os.path.join(folder, f"rank{int(rank)}.txt")
    try:
        with open(path + ".tmp", "w") as fh:
            fh.write(message)
        os.replace(path + ".tmp", path)
    except OSError:
        return False
    return True


def collected(folder: str | None) -> dict[str, list[int]]:
    """Each distinct message left in ``folder`` with the ranks that reported it, in rank order."""
    by_rank: dict[int, str] = {}
    for name in os.listdir(folder) if folder and os.path.isdir(folder) else ():
        if name.startswith("rank") and name.endswith(".txt") and name[4:-4].isdigit():
            with open(os.path.join(folder, name)) as fh:
                by_rank[int(name[4:-4])] = fh.read()
    out: dict[str, list[int]] = {}
    for rank in sorted(by_rank):
        out.setdefault(by_rank[rank], []).append(rank)
    return out


def format_messages(messages: dict[str, list[int]]) -> list[str]:
    """One line per distinct message: ``msmoe: error: ...``, naming the ranks when rank 0 did not say it."""
    lines = []
    for text, ranks in messages.items():
        who = "" if 0 in ranks else f"[rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}] "
        lines.append(f"{who}msmoe: error: {text}")
    return lines


class _HeldLog(logging.Filter):
    """Keeps back the records of one logger; ``release`` lets them through after all."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.logger, self.records = logging.getLogger(name), []
        self.logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def release(self, show: bool = True) -> None:
        self.logger.removeFilter(self)
        for record in self.records if show else ():
            self.logger.handle(record)
        self.records = []


def main(argv: list[str] | None = None) -> None:
    """torch's ``torchrun`` entry point, reporting the workers' user errors once (module docstring)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    held = _HeldLog(TORCH_PROCESS_LOG)
    quiet = False
    try:
        torchrun_main(argv)
    except ChildFailedError as exc:
        messages = collected(os.environ.get(ENV))
        rank, failure = exc.get_first_failure()
        quiet = failure.exitcode == USER_ERROR_EXIT and any(rank in ranks for ranks in messages.values())
        held.release(show=not quiet)
        for line in format_messages(messages):
            print(line, file=sys.stderr, flush=True)
        if quiet:
            sys.exit(USER_ERROR_EXIT)
        raise
    finally:
        held.release()


if __name__ == "__main__":
    main()

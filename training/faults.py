"""Fault injection for the reliability tests (and for trying a deployment's recovery by hand).

``MSMOE_FAULT`` holds ``kind@step[:rank]`` items separated by ``;``. Nothing happens without it.

  kill_in_save@10        SIGKILL rank 0 (or the given rank) after DeepSpeed wrote the step-10
                         checkpoint, before it is committed
  kill@12:1              SIGKILL rank 1 at the start of step 12 (first run only; an elastic
                         restart does not repeat it)
  stall@3:1              rank 1 stops calling collectives at the start of step 3 (sleeps)
  nan_loss@5             the loss of step 5 is NaN on every rank (or the given rank)
  fill_disk@20           rank 0 fills the filesystem of the run's out_dir (a file FILL_NAME there,
                         written up to ENOSPC) once training ends at step 20 with its checkpoint
                         committed: the report's writes then meet a really full disk. Only on a
                         filesystem of at most 256 MiB (a test's tmpfs): elsewhere it is refused

The variable is parsed once, at start-up, into a :class:`FaultPlan` that the trainer and the
checkpoint writer are handed (like the stage timer); :data:`NO_FAULTS` is the default. Faults
fire only in the first attempt of an elastic job (TORCHELASTIC_RESTART_COUNT unset or 0), so a
restarted job shows recovery, not the same fault again.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from dataclasses import dataclass
from typing import Mapping

from common.config import ConfigError

ENV = "MSMOE_FAULT"
KINDS = ("kill_in_save", "kill", "stall", "nan_loss", "fill_disk")
PROCESS_FAULTS = ("kill_in_save", "kill", "stall", "fill_disk")  # these default to rank 0; nan_loss to every rank
FILL_NAME = "msmoe_fault_fill"  # fill_disk's file; delete it to free the space again
FILL_LIMIT = 256 << 20  # bytes: fill_disk refuses a larger filesystem


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None  # None: the kind's default (rank 0 for process faults, every rank for nan_loss)

    def hits(self, kind: str, step: int, rank: int) -> bool:
        target = self.rank if self.rank is not None else (0 if kind in PROCESS_FAULTS else None)
        return self.kind == kind and self.step == step and target in (None, rank)


@dataclass(frozen=True)
class FaultPlan:
    faults: tuple[Fault, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "FaultPlan":
        env = os.environ if environ is None else environ
        if int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
            return NO_FAULTS
        return cls.parse(env.get(ENV, ""))

    @classmethod
    def parse(cls, spec: str) -> "FaultPlan":
        out = []
        for item in filter(None, (s.strip() for s in spec.split(";"))):
            kind, _, rest = item.partition("@")
            step, _, rank = rest.partition(":")
            if kind not in KINDS or not step.isdigit() or (rank and not rank.isdigit()):
                raise ConfigError(f"{ENV}={spec!r}: item {item!r} must look like kind@step or kind@step:rank "
                                  f"with kind one of {list(KINDS)}")
            out.append(Fault(kind, int(step), int(rank) if rank else None))
        return cls(tuple(out))

    def fires(self, kind: str, step: int, rank: int) -> bool:
        return any(f.hits(kind, step, rank) for f in self.faults)

    def at_step_start(self, step: int, rank: int) -> None:
        """The faults planned for the start of a step: a kill, or a stall."""
        self.process_fault("kill", step, rank)
        self.process_fault("stall", step, rank)

    def process_fault(self, kind: str, step: int, rank: int) -> None:
        """Carry out a process fault (kill / kill_in_save / stall) if one is planned for this step and rank."""
        if not self.fires(kind, step, rank):
            return
        if kind in ("kill_in_save", "kill"):
            print(f"fault injection: SIGKILL rank {rank} at step {step} ({kind})", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "stall":
            print(f"fault injection: rank {rank} stops calling collectives at step {step}", flush=True)
            while True:
                time.sleep(3600)

    def fill_disk(self, step: int, rank: int, folder: str) -> None:
        """Fill ``folder``'s filesystem to the last byte if ``fill_disk`` is planned for this step and rank."""
        if not self.fires("fill_disk", step, rank):
            return
        total = shutil.disk_usage(folder).total
        if total > FILL_LIMIT:
            raise ConfigError(f"{ENV}: fill_disk@{step} would fill the filesystem of {folder} ({total >> 20} MiB); "
                              f"it runs only on one of at most {FILL_LIMIT >> 20} MiB: set out_dir on a small tmpfs")
        path = os.path.join(folder, FILL_NAME)
        print(f"fault injection: rank {rank} fills the filesystem of {folder} ({path}) after step {step}", flush=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for size in (1 << 20, 1 << 12, 1):  # down to the last byte of the last page
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        finally:
            os.close(fd)


NO_FAULTS = FaultPlan()

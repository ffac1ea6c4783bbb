"""Fault injection for the reliability tests (and for trying a deployment's recovery by hand).

``MSMOE_FAULT`` holds ``kind@step[:rank]`` items separated by ``;``. Nothing happens without it.

  kill_in_save@10        SIGKILL rank 0 (or the given rank) after DeepSpeed wrote the step-10
                         checkpoint, before it is committed
  kill@12:1              SIGKILL rank 1 at the start of step 12 (first run only; an elastic
                         restart does not repeat it)
  stall@3:1              rank 1 stops calling collectives at the start of step 3 (sleeps)
  nan_loss@5             the loss of step 5 is NaN on every rank (or the given rank)

The variable is parsed once, at start-up, into a :class:`FaultPlan` that the trainer and the
checkpoint writer are handed (like the stage timer); :data:`NO_FAULTS` is the default. Faults
fire only in the first attempt of an elastic job (TORCHELASTIC_RESTART_COUNT unset or 0), so a
restarted job shows recovery, not the same fault again.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Mapping

from moe.config import ConfigError

ENV = "MSMOE_FAULT"
KINDS = ("kill_in_save", "kill", "stall", "nan_loss")
PROCESS_FAULTS = ("kill_in_save", "kill", "stall")  # these default to rank 0; nan_loss to every rank


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


NO_FAULTS = FaultPlan()

"""Fault injection for the reliability tests (and for trying a deployment's recovery by hand).

``MSMOE_FAULT`` holds ``kind@step[:rank]`` items separated by ``;``. Nothing happens without it.

  kill_in_save@10        SIGKILL rank 0 (or the given rank) after DeepSpeed wrote the step-10
                         checkpoint, before it is committed
  kill@12:1              SIGKILL rank 1 at the start of step 12 (first run only; an elastic
                         restart does not repeat it)
  stall@3:1              rank 1 stops calling collectives at the start of step 3 (sleeps)
  nan_loss@5             the loss of step 5 is NaN on every rank (or the given rank)

Faults fire only in the first attempt of an elastic job (TORCHELASTIC_RESTART_COUNT unset or 0),
so a restarted job shows recovery, not the same fault again.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "MSMOE_FAULT"


def _items() -> list[tuple[str, int, int | None]]:
    spec = os.environ.get(ENV, "")
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        try:
            kind, rest = item.split("@", 1)
            step, _, rank = rest.partition(":")
            out.append((kind, int(step), int(rank) if rank else None))
        except ValueError:
            raise ValueError(f"{ENV}={spec!r}: item {item!r} must look like kind@step or kind@step:rank") from None
    return out


def active(kind: str, step: int, rank: int) -> bool:
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return False
    default_rank = 0 if kind in ("kill_in_save", "kill", "stall") else None
    for k, s, r in _items():
        if k == kind and s == step and (r if r is not None else default_rank) in (None, rank):
            return True
    return False


def maybe(kind: str, step: int, rank: int) -> None:
    """Carry out a process fault (kill / stall) if one is set for this step and rank."""
    if not active(kind, step, rank):
        return
    if kind in ("kill_in_save", "kill"):
        print(f"fault injection: SIGKILL rank {rank} at step {step} ({kind})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "stall":
        print(f"fault injection: rank {rank} stops calling collectives at step {step}", flush=True)
        while True:
            time.sleep(3600)

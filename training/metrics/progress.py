"""How a run shows its progress on rank 0 (other ranks show none):

  bar    a tqdm bar updated after every step (loss parts, samples/s): for a terminal
  lines  one plain line per logging step (step, loss, samples/s, ETA), no carriage returns: for a
         log file (a SLURM job's output, ``> train.log``)
  off    nothing

``msmoe train`` picks ``bar`` when stdout is a terminal and ``lines`` otherwise; ``--progress`` /
``--no-progress`` force the bar / the plain lines (launcher/train.py).
"""

from __future__ import annotations

from typing import Literal

from tqdm import tqdm

from training.metrics.records import StepResult

ProgressMode = Literal["bar", "lines", "off"]
PROGRESS_MODES = ("bar", "lines", "off")


def format_eta(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_line(name: str, total: int, record: dict) -> str:
    """The plain line of a logging step from its metrics record (training/metrics/interval.py: interval_record)."""
    loss = record["loss"]

    def num(v):
        return "nan" if v is None else f"{v:.4f}"

    return (f"train {name} step {record['step']}/{total}  loss {num(loss['total'])} (id {num(loss['id'])} "
            f"tri {num(loss['triplet'])} aux {num(loss['aux'])})  lr {record['lr']:.3g}  "
            f"{record['samples_per_s']:.1f} samples/s  ETA {format_eta(record['eta_s'])}")


class ProgressBar:
    def __init__(self, name: str, start: int, total: int) -> None:
        self.bar = tqdm(total=total, initial=start, desc=f"train {name}", unit="step", dynamic_ncols=True)

    def update(self, r: StepResult, samples_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{r.loss:.3f}", id=f"{r.id:.3f}", tri=f"{r.triplet:.3f}",
                             samples_s=f"{samples_per_s:.1f}")
        self.bar.update(1)

    def logged(self, record: dict) -> None:
        pass

    def close(self) -> None:
        self.bar.close()


class ProgressLines:
    def __init__(self, name: str, total: int) -> None:
        self.name, self.total = name, total

    def update(self, r: StepResult, samples_per_s: float) -> None:
        pass

    def logged(self, record: dict) -> None:
        print(progress_line(self.name, self.total, record), flush=True)

    def close(self) -> None:
        pass


class NoProgress:
    def update(self, r: StepResult, samples_per_s: float) -> None:
        pass

    def logged(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def build_progress(mode: ProgressMode, name: str, start: int, total: int):
    """The display for ``mode`` (see the module docstring)."""
    if mode == "bar":
        return ProgressBar(name, start, total)
    if mode == "lines":
        return ProgressLines(name, total)
    if mode == "off":
        return NoProgress()
    raise ValueError(f"progress mode {mode!r}: expected one of {PROGRESS_MODES}")

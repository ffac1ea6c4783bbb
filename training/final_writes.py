"""A finished run's last writes, checkpoint-grade: ``summary.json``, the report (``report.md`` and
its plots), then ``COMPLETE``, in that order, each through a temp file in the run directory, fsync
and rename (common/files.py), so a failed write leaves the old file or none, never a cut or
0-byte one, and ``COMPLETE`` exists only once everything before it is on disk.

By then the final checkpoint is committed. A write that fails (a full disk, a quota, an I/O
error) is raised as :class:`ReportWriteError` on every rank, naming the file, the cause, the
checkpoint that is safe and the command that writes the report again: the same ``msmoe train``
with ``--resume`` evaluates that checkpoint and writes the outputs without training a step.
"""

from __future__ import annotations

import os
import shlex

from common.errors import UserError
from common.files import write_text_atomic
from training.checkpoint.store import COMPLETE, tag_of
from training.collect import first_error
from training.metrics.records import write_json
from training.report.report import write_report
from training.checkpoint.save_guard import describe


class ReportWriteError(UserError, OSError):
    """A run's summary or report could not be written; its final checkpoint is complete."""


def write_outputs(run_dir: str, summary: dict, fusion_weights, steps: int) -> None:
    """Rank 0: summary.json, report.md and its plots, then COMPLETE (job scripts read it: msmoe submit)."""
    write_json(os.path.join(run_dir, "summary.json"), summary)
    write_report(summary, run_dir, fusion_weights)
    write_text_atomic(os.path.join(run_dir, COMPLETE), f"{steps}\n")


def failure(exc: OSError, run_dir: str) -> str:
    """'PATH: CAUSE (N bytes free on its filesystem)' of a failed write (training/checkpoint/save_guard.py)."""
    return describe(str(exc.filename or run_dir), exc)


def resume_command(config: str, overrides: tuple[str, ...], world_size: int) -> str:
    nproc = ["--nproc", str(world_size)] if world_size > 1 else []
    return shlex.join(["msmoe", "train", "--config", config, *nproc, *overrides, "--resume"])


def agree(error: str | None, world_size: int, step: int, run_dir: str, ckpt_dir: str, command: str) -> None:
    """Every rank calls it with rank 0's failure (others: None); if there was one, every rank raises
    the same ReportWriteError (none is left waiting for rank 0)."""
    error = first_error(error, world_size, "outcome of the run's final writes")
    if error is None:
        return
    raise ReportWriteError(
        f"the run's report could not be written ({error}); training is done and its checkpoint "
        f"{tag_of(step)} (step {step}) is committed and safe in {ckpt_dir}, but {run_dir} is not marked "
        f"{COMPLETE}. Free some space, then write the report without training: `{command}` "
        f"(it evaluates {tag_of(step)} again)")

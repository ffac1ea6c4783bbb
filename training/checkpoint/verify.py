"""Offline check of a checkpoint directory (``msmoe checkpoints verify``): one process, no engine.

  msmoe checkpoints verify runs/tiny                # a run directory (its checkpoints/)
  msmoe checkpoints verify runs/tiny/checkpoints    # or the checkpoint directory itself

Every step is listed: complete or not, whether its files match the manifest (``verified``,
``mismatch``), or ``unverified`` for a legacy marker (a bare step number), with its run_id, file
count and bytes; the problems follow the table. :func:`verify_dir` returns 0 when the newest
complete step verifies, else 1 (a legacy newest step cannot be verified: 1 too).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

from training.checkpoint import manifest, read_lock
from training.checkpoint.store import CKPT_DIR, CheckpointUnverified, list_steps
from training.checkpoint.layout_check import layout_problems


@dataclass(frozen=True)
class StepReport:
    step: int
    tag: str
    complete: bool
    check: str  # verified | mismatch | unverified (legacy) | - (incomplete)
    run_id: str | None
    files: int
    bytes: int
    problems: list[str] = field(default_factory=list)


def checkpoint_dir(path: str) -> str:
    """A run directory's checkpoints/, or ``path`` itself when it holds steps."""
    inner = os.path.join(path, CKPT_DIR)
    if os.path.isdir(inner):
        return inner
    if os.path.isdir(path):
        return path
    raise FileNotFoundError(f"no such run or checkpoint directory: {path}")


def _on_disk(step_dir: str) -> tuple[int, int]:
    names = manifest.list_files(step_dir)
    return len(names), sum(os.path.getsize(os.path.join(step_dir, n)) for n in names)


def inspect(ckpt_dir: str, step: int, tag: str, complete: bool) -> StepReport:
    step_dir = os.path.join(ckpt_dir, tag)
    if not complete:
        return StepReport(step, tag, False, "-", None, *_on_disk(step_dir))
    try:
        marker = manifest.read(step_dir)
    except (OSError, manifest.MarkerError) as exc:
        return StepReport(step, tag, True, "mismatch", None, *_on_disk(step_dir),
                          problems=[f"{manifest.MARKER}: unreadable ({exc})"])
    if marker.legacy:
        return StepReport(step, tag, True, "unverified (legacy)", None, *_on_disk(step_dir))
    problems = manifest.check(step_dir, marker.files, sorted(marker.files))
    problems += layout_problems(step_dir, sorted(marker.files), marker.layout)
    return StepReport(step, tag, True, "mismatch" if problems else "verified", marker.run_id, len(marker.files),
                      sum(int(f["size"]) for f in marker.files.values()), problems)


def survey(ckpt_dir: str) -> list[StepReport]:
    return [inspect(ckpt_dir, s, t, c) for s, t, c in list_steps(ckpt_dir)]


def format_table(ckpt_dir: str, reports: list[StepReport]) -> str:
    head = ("step", "tag", "state", "check", "run_id", "files", "bytes")
    rows = [(str(r.step), r.tag, "complete" if r.complete else "incomplete", r.check,
             "-" if r.run_id is None else (r.run_id or '""'), str(r.files), f"{r.bytes:,}") for r in reports]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [f"checkpoints in {ckpt_dir}"]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in (head, *rows)]
    for r in reports:
        lines += [f"{r.tag} (step {r.step}): {p}" for p in r.problems]
    return "\n".join(lines)


def verdict(reports: list[StepReport]) -> tuple[str, int]:
    """(one line, exit code): 0 when the newest complete step verifies."""
    done = [r for r in reports if r.complete]
    if not done:
        return "no complete checkpoint", 1
    newest = done[-1]
    if newest.check == "verified":
        return f"newest complete: {newest.tag}, verified", 0
    usable = next((r.tag for r in reversed(done) if r.check != "mismatch"), None)  # what --resume loads
    return f"newest complete: {newest.tag}, {newest.check}; --resume would use {usable or 'none'}", 1


def verify_dir(path: str) -> tuple[str, int]:
    """The table and verdict for a run or checkpoint directory, and the exit code."""
    ckpt_dir = checkpoint_dir(path)
    reports = survey(ckpt_dir)
    line, code = verdict(reports)
    return format_table(ckpt_dir, reports) + "\n" + line, code


@contextlib.contextmanager
def reading(ckpt_dir: str, tag: str | None = None, what: str = "export",
            log: Callable[[str], None] = print) -> Iterator[str]:
    """For a reader in one process (export, convert): the newest complete step whose files match
    its manifest and its layout (or ``tag``, checked alike), held under its read lock while the
    caller reads it, so a training that prunes the directory leaves it alone. Says which step, and
    why a newer one was passed over. Raises CheckpointUnverified / FileNotFoundError (exit 2)."""
    passed: list[tuple[str, str]] = []
    asked = "as --tag asks"
    if tag is None and not any(c for _, _, c in list_steps(ckpt_dir)):
        latest = os.path.join(ckpt_dir, "latest")  # a plain DeepSpeed save (no msmoe commit): its pointer
        if os.path.isfile(latest):
            with open(latest) as fh:
                tag, asked = fh.read().strip() or None, "as its 'latest' file names it"
    for _ in range(3):  # a prune may delete a step between the listing and its lock
        steps = [(s, t) for s, t, c in reversed(list_steps(ckpt_dir)) if c and (tag is None or t == tag)]
        if not steps:
            break
        for step, t in steps:
            with read_lock.shared(ckpt_dir, t):
                if not os.path.isfile(os.path.join(ckpt_dir, t, manifest.MARKER)):
                    continue  # pruned just now
                report = inspect(ckpt_dir, step, t, True)
                if report.check == "mismatch":
                    passed.append((t, report.problems[0]))
                    log(f"warning: {what}: {t} (step {step}) in {ckpt_dir} does not verify: {report.problems[0]}")
                    continue
                note = "" if not passed else f", instead of {passed[0][0]}, which does not verify"
                kind = "unverifiable (old marker)" if report.check != "verified" else "verified"
                log(f"{what}: {t} (step {step}), the newest {kind} checkpoint in {ckpt_dir}{note}")
                yield t
                return
        if passed:
            break
    if tag is not None and not passed and os.path.isdir(os.path.join(ckpt_dir, tag)):
        with read_lock.shared(ckpt_dir, tag):  # named by the user, but no manifest: e.g. another tool's checkpoint
            log(f"warning: {what}: {tag} in {ckpt_dir} has no {manifest.MARKER} manifest (not committed by msmoe's "
                f"training): using it unverified, {asked}")
            yield tag
            return
    if passed:
        why = "; ".join(f"{t}: {p}" for t, p in passed)
        raise CheckpointUnverified(f"{what}: no checkpoint in {ckpt_dir} matches its manifest ({why}); "
                                   f"`msmoe checkpoints verify {ckpt_dir}` lists them")
    named = f" named {tag}" if tag else ""
    raise FileNotFoundError(f"{what}: no complete checkpoint{named} in {ckpt_dir}: train the run first"
                            + (" (or name another --tag)" if tag else ""))

"""Atomic, verified, pruned checkpoints of a run on top of DeepSpeed's ``save_checkpoint``.

Layout (``runs/<name>/checkpoints/``)
  step0000020/            DeepSpeed's files (model, one file per global expert, optimizer per rank)
  step0000020/COMMITTED   the manifest (training/checkpoint/manifest.py: step, run_id, every file's size and
                          blake2b), written by rank 0 after every rank finished writing and hashed its
                          share of the files: the checkpoint is complete
  latest                  name of the newest committed checkpoint (written to a temp file, then renamed)

A crash anywhere before COMMITTED leaves a directory without it: :func:`newest_complete` ignores
such directories (and ``latest`` is only moved after the commit). A write that fails (disk full)
raises CheckpointWriteError on every rank and leaves the step uncommitted (training/checkpoint/save_guard.py).
``--resume`` (:func:`resume`) loads the newest complete step whose files still match their manifest,
checked by all ranks together before DeepSpeed reads anything; a step that does not match is named
and the next older verified one is used. After each commit all but the newest ``keep_last`` complete
checkpoints *of this run* (its run_id), and the incomplete leftovers older than the newest, are deleted.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil

from common.errors import UserError
from common.files import write_text_atomic
from training.checkpoint import manifest
from training.collect import first_error, from_rank0, gathered
from training.faults import NO_FAULTS, FaultPlan
from parallel.ds_names import OPTIM_FILE_RE
from training.checkpoint.layout_check import layout_problems
from training.checkpoint.manifest import MARKER
from training.checkpoint.read_lock import delete_unless_read, shared
from training.checkpoint.save_guard import CheckpointWriteError, describe, recorded_writes, write_error

CKPT_DIR = "checkpoints"  # inside the run directory
COMPLETE = "COMPLETE"  # inside the run directory: the run finished and reported (job scripts read it)

__all__ = ["CKPT_DIR", "COMPLETE", "MARKER", "CheckpointMismatch", "CheckpointUnverified", "CheckpointWriteError"]


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint that does not fit the model the config builds (another shape)."""


class CheckpointUnverified(UserError, FileNotFoundError):
    """--resume found complete checkpoints, but none whose files match their manifest."""


_TAG = re.compile(r"^step(\d{7,})$")
PARTIAL = ".partial-"  # <tag>.partial-<nonce>: a save being written (not a step until renamed)
REPLACED = ".replaced-"  # <tag>.replaced-<nonce>: a step moved aside by a newer save of the same step
_LEFTOVER = re.compile(r"^step(\d{7,})(?:" + re.escape(PARTIAL) + "|" + re.escape(REPLACED) + r")[0-9a-f]+$")


def tag_of(step: int) -> str:
    return f"step{step:07d}"


def list_steps(ckpt_dir: str) -> list[tuple[int, str, bool]]:
    """(step, tag, complete) of every checkpoint directory, oldest first; the directory of a save
    that did not finish (``<tag>.partial-<nonce>``, ``<tag>.replaced-<nonce>``) is listed as incomplete."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = _TAG.match(name) or _LEFTOVER.match(name)
        if m and os.path.isdir(os.path.join(ckpt_dir, name)):
            done = name == tag_of(int(m.group(1))) and os.path.isfile(os.path.join(ckpt_dir, name, MARKER))
            out.append((int(m.group(1)), name, done))
    return sorted(out)


def newest_complete(ckpt_dir: str) -> str | None:
    done = [tag for _, tag, complete in list_steps(ckpt_dir) if complete]
    return done[-1] if done else None


def is_complete(ckpt_dir: str, step: int) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, tag_of(step), MARKER))


def incomplete(ckpt_dir: str) -> list[str]:
    return [tag for _, tag, complete in list_steps(ckpt_dir) if not complete]


# ------------------------------------------------------------------ save
def save(engine, ckpt_dir: str, step: int, client: dict, keep_last: int, rank: int, world_size: int,
         faults: FaultPlan = NO_FAULTS, run_id: str = "", layout: dict | None = None) -> str:
    """Write, hash, commit and prune; every rank calls it. Returns the tag. A failed write raises
    CheckpointWriteError on every rank; the step then stays uncommitted.

    The files go to a fresh directory ``<tag>.partial-<nonce>`` (rank 0 picks the nonce), never into
    an existing step: once its manifest is written it is renamed to ``<tag>``, replacing a step of
    the same number (e.g. one that did not verify) as a whole, so a directory only ever holds the
    files of one save, of one layout (``layout``: EP size, world size, ZeRO stage, in the manifest)."""
    tag = tag_of(step)
    work = from_rank0(f"{tag}{PARTIAL}{secrets.token_hex(4)}" if rank == 0 else None, world_size)
    step_dir = os.path.join(ckpt_dir, work)
    previous = newest_complete(ckpt_dir)  # a failed save leaves every existing step as it was
    with recorded_writes(engine) as failed:
        try:
            engine.save_checkpoint(ckpt_dir, tag=work, client_state=client, save_latest=False)
        except (OSError, RuntimeError) as exc:
            failed.append((step_dir, exc))
    faults.process_fault("kill_in_save", step, rank)  # files written, not yet committed
    error = f"rank {rank}: {describe(*failed[0])}" if failed else None
    _raise_if(first_error(error, world_size), step, ckpt_dir, previous, rank, work)  # every rank's files are on disk
    names = from_rank0(manifest.list_files(step_dir) if rank == 0 else None, world_size)
    files, error = {}, None
    try:
        files = manifest.entries(step_dir, manifest.share(names, rank, world_size))
    except OSError as exc:
        error = f"rank {rank}: {describe(step_dir, exc)}"
    shares = gathered((files, error), world_size)
    error = next((e for _, e in shares if e), None)
    if rank == 0 and error is None:
        try:
            manifest.write(step_dir, step, run_id, {k: v for part, _ in shares for k, v in part.items()}, layout)
            _swap_in(ckpt_dir, work, tag)
            write_text_atomic(os.path.join(ckpt_dir, "latest"), tag)
        except OSError as exc:
            error = f"rank 0: {describe(os.path.join(step_dir, MARKER), exc)}"
        else:
            prune(ckpt_dir, keep_last, run_id)
    _raise_if(first_error(error, world_size), step, ckpt_dir, previous, rank, work)
    return tag


def _swap_in(ckpt_dir: str, work: str, tag: str) -> None:
    """Rename the committed ``work`` directory to ``tag``; a directory already there (a step saved
    again) is moved aside first and deleted after, never written into."""
    final = os.path.join(ckpt_dir, tag)
    old = None
    if os.path.lexists(final):
        old = os.path.join(ckpt_dir, tag + REPLACED + work.rsplit("-", 1)[-1])
        os.rename(final, old)
    os.rename(os.path.join(ckpt_dir, work), final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _raise_if(error: str | None, step: int, ckpt_dir: str, previous: str | None, rank: int, work: str) -> None:
    if error is None:
        return
    if rank == 0:  # the commit failed: the fresh directory never becomes a step
        shutil.rmtree(os.path.join(ckpt_dir, work), ignore_errors=True)
    raise write_error(error, step, tag_of(step), ckpt_dir, previous)


def mark_complete(ckpt_dir: str, tag: str, run_id: str = "") -> None:
    """Commit a checkpoint written in one piece by another tool (e.g. ``msmoe convert``): its
    manifest, hashed in this process, then ``latest``."""
    m = _TAG.match(tag)
    step_dir = os.path.join(ckpt_dir, tag)
    names = manifest.list_files(step_dir)
    optim = [n for n in names if OPTIM_FILE_RE.search(n)]  # the tool wrote one layout: its files say which
    manifest.write(step_dir, int(m.group(1)) if m else 0, run_id, manifest.entries(step_dir, names),
                   {"ep_size": len(optim)} if optim else None)
    write_text_atomic(os.path.join(ckpt_dir, "latest"), tag)


# ------------------------------------------------------------------ prune
def run_of(ckpt_dir: str, tag: str) -> str | None:
    """The run_id in a step's manifest (None: a legacy marker or an unreadable one)."""
    try:
        return manifest.read(os.path.join(ckpt_dir, tag)).run_id
    except (OSError, manifest.MarkerError):
        return None


def prune(ckpt_dir: str, keep_last: int, run_id: str) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints of run ``run_id`` (another run's
    and legacy ones are never touched), and incomplete ones older than its newest complete one.
    Returns the deleted tags."""
    tags = list_steps(ckpt_dir)
    mine = [(s, t) for s, t, c in tags if c and run_of(ckpt_dir, t) == run_id]
    if not mine:
        return []
    newest_step = mine[-1][0]
    doomed = [t for _, t in mine[:-keep_last]] + [t for s, t, c in tags if not c and s < newest_step]
    doomed += sorted(t for _, t, _ in tags if _LEFTOVER.match(t) and t not in doomed)  # killed saves' dirs
    return [t for t in doomed if delete_unless_read(ckpt_dir, t)]


def load(engine, ckpt_dir: str, config_name: str, **kwargs) -> tuple[str | None, dict | None]:
    """DeepSpeed's ``load_checkpoint``, with a clear error for a checkpoint of another model shape."""
    try:
        return engine.load_checkpoint(ckpt_dir, **kwargs)
    except RuntimeError as exc:
        text = str(exc)
        if "size mismatch" in text or "Missing key" in text or "Unexpected key" in text:
            first = next((ln.strip() for ln in text.splitlines() if "size mismatch" in ln or "key" in ln), "")
            raise CheckpointMismatch(
                f"the checkpoint in {ckpt_dir} was saved by a model of another shape than config "
                f"{config_name!r} builds ({first[:200]}); train with the config it was saved with "
                f"(its run directory holds config.yaml), or change the expert count with `msmoe convert`"
            ) from None
        raise


def resume(engine, ckpt_dir: str, config_name: str, rank: int = 0, world_size: int = 1, prepare=None,
           loader=None) -> dict:
    """Load the newest complete checkpoint whose files match its manifest (weights, optimizer);
    every rank calls it and all load the same step. Returns its client state.

    ``prepare(ckpt_dir, tag) -> load_dir``, if given, runs on every rank once the tag is chosen and
    says where DeepSpeed loads it from (training/checkpoint/elastic.py: a copy resharded to this run's EP size);
    ``loader(engine, load_dir, config_name, tag)`` (default :func:`load`) loads it."""
    tag = choose_verified(ckpt_dir, config_name, rank, world_size)
    load_dir = ckpt_dir if prepare is None else prepare(ckpt_dir, tag)  # elastic EP: maybe a resharded copy
    path, client = (loader or load)(engine, load_dir, config_name, tag=tag)
    if path is None:
        raise RuntimeError(f"--resume: DeepSpeed could not load {tag} in {load_dir}")
    return client


def choose_verified(ckpt_dir: str, config_name: str, rank: int = 0, world_size: int = 1,
                    what: str = "--resume") -> str:
    """The newest complete step whose files match its manifest (a legacy marker counts, with a
    warning) and that holds the files of one layout. Every rank hashes its share of each candidate's files; rank 0 reports what is wrong,
    decides, and broadcasts the tag, so all ranks load the same step. Raises CheckpointUnverified
    (or FileNotFoundError when nothing is complete)."""
    candidates = from_rank0([t for _, t, c in reversed(list_steps(ckpt_dir)) if c] if rank == 0 else None,
                             world_size)
    fresh = f"; run without --resume to start {config_name!r} from scratch" if what == "--resume" else ""
    if not candidates:
        partial = incomplete(ckpt_dir)
        raise FileNotFoundError(f"{what}: no complete checkpoint in {ckpt_dir}"
                                + (f" (incomplete, ignored: {partial})" if partial else "")
                                + fresh)
    failed: list[tuple[str, list[str]]] = []
    chosen, legacy = None, False
    for tag in candidates:
        legacy, problems = _verify_share(os.path.join(ckpt_dir, tag), rank, world_size)
        problems = sorted({p for part in gathered(problems, world_size) for p in part})
        if not problems:
            chosen = tag
            break
        failed.append((tag, problems))
        if rank == 0:
            for p in problems:
                print(f"warning: checkpoint {tag} (step {_step(tag)}) in {ckpt_dir}: {p}", flush=True)
    chosen = from_rank0(chosen, world_size)  # rank 0 decides; every rank loads this one
    if chosen is None:
        why = "; ".join(f"{t}: {len(ps)} problem(s), first: {ps[0]}" for t, ps in failed)
        raise CheckpointUnverified(f"{what}: no checkpoint in {ckpt_dir} matches its manifest (tried {why}); "
                                   f"`msmoe checkpoints verify {ckpt_dir}` lists them{fresh}")
    if rank == 0 and failed:
        doing = "resuming from" if what == "--resume" else f"{what}: using"
        print(f"warning: {doing} {chosen} (step {_step(chosen)}), the newest verified checkpoint, instead "
              f"of {failed[0][0]} (step {_step(failed[0][0])}), whose files do not match its manifest", flush=True)
    if rank == 0 and legacy:
        print(f"warning: {chosen} has an old COMMITTED marker (a step number, no file list): resuming from it "
              f"unverified", flush=True)
    return chosen


def _step(tag: str) -> int:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else -1


def _verify_share(step_dir: str, rank: int, world_size: int) -> tuple[bool, list[str]]:
    """(legacy marker?, problems with this rank's share of the step's files)."""
    try:
        marker = manifest.read(step_dir)
    except (OSError, manifest.MarkerError) as exc:
        return False, [f"{MARKER}: unreadable ({exc})"]
    if marker.legacy:
        return True, []
    problems = manifest.check(step_dir, marker.files, manifest.share(list(marker.files), rank, world_size))
    if rank == 0:  # the files of exactly one layout (training/checkpoint/layout_check.py)
        problems += layout_problems(step_dir, sorted(marker.files), marker.layout)
    return False, problems


def load_weights(engine, ckpt_dir: str, config_name: str, rank: int = 0, world_size: int = 1,
                 what: str = "--init-from") -> tuple[int, str]:
    """Weights only (no optimizer state), e.g. a checkpoint converted to another expert count, from
    the newest complete step whose files match its manifest (not ``latest`` blindly: all ranks agree
    on it, rank 0 says which), read under the step's read lock, so a training pruning the same
    directory waits for it. Returns (the step it was saved at (0 if unknown), the tag)."""
    for _ in range(3):  # a prune may delete the chosen step before its lock is taken: choose again
        tag = choose_verified(ckpt_dir, config_name, rank, world_size, what=what)
        with shared(ckpt_dir, tag):
            here = os.path.isfile(os.path.join(ckpt_dir, tag, MARKER))
            if all(gathered(here, world_size)):
                if rank == 0:
                    print(f"{what}: loading the weights of {tag} (step {_step(tag)}), the newest verified "
                          f"checkpoint in {ckpt_dir}", flush=True)
                path, client = load(engine, ckpt_dir, config_name, tag=tag, load_module_only=True,
                                    load_optimizer_states=False, load_lr_scheduler_states=False)
                if path is None:
                    raise RuntimeError(f"DeepSpeed could not load the weights of {tag} in {ckpt_dir}")
                return int((client or {}).get("step", 0)), tag
    raise CheckpointUnverified(f"{what}: the checkpoints of {ckpt_dir} were deleted while loading them (a "
                               "training pruning its steps); run again")

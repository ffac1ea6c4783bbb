"""Who owns a run directory: one writer at a time, and no run silently taking over another's.

``runs/<name>/run.json``  the run's identity: a random run id, when and where it was created. Every
                          checkpoint it commits carries the id, and pruning deletes only checkpoints
                          with its own id. Lost or garbled, ``--resume`` takes the id back from the
                          checkpoints' manifests, with a warning (the garbled file is kept aside).
``runs/<name>/.lock``     held while a run writes the directory (host, PID, start time), created
                          atomically (O_EXCL). A lock left by a dead process on this host is taken
                          over with a message; one held by a live process (or by another host) stops
                          the new run with exit 2, naming the holder.

Starting a run (no ``--resume``) in a directory that already holds committed checkpoints needs
``--overwrite`` (which deletes them); without it the run stops before anything is written.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import sys
import uuid
from dataclasses import asdict, dataclass

from common.errors import UserError
from common.files import write_text_atomic
from training.checkpoint.store import CKPT_DIR, COMPLETE, list_steps, newest_complete, run_of

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
# written by a finished run; deleted with --overwrite so nothing of the old run is mistaken for the new
RUN_OUTPUTS = (COMPLETE, "summary.json", "report.md", "eval.json", "untrained.json", "config.yaml")


class RunOwnershipError(UserError, ValueError):
    """The run directory belongs to another run or is being written by another process."""


@dataclass(frozen=True)
class RunIdentity:
    run_id: str
    name: str
    created: str
    host: str

    @classmethod
    def new(cls, name: str) -> "RunIdentity":
        return cls(uuid.uuid4().hex[:12], name, _now(), socket.gethostname())


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _load_identity(run_dir: str) -> tuple[RunIdentity | None, str]:
    """(the identity in run.json, or None and what is wrong with the file: "is missing", ...)."""
    try:
        with open(os.path.join(run_dir, RUN_FILE)) as fh:
            text = fh.read()
    except FileNotFoundError:
        return None, "is missing"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    try:
        doc = json.loads(text)
        ident = RunIdentity(**doc)
        if not (isinstance(ident.run_id, str) and ident.run_id):
            raise ValueError(f"run_id {ident.run_id!r}")
        return ident, ""
    except (ValueError, TypeError) as exc:
        return None, f"is not a run record ({type(exc).__name__}: {str(exc)[:80]}; {len(text)} bytes)"


def read_identity(run_dir: str) -> RunIdentity | None:
    return _load_identity(run_dir)[0]


def recorded_identity(run_dir: str, name: str) -> tuple[RunIdentity, str] | None:
    """The run's identity as its checkpoints record it: the run_id in the manifest of the newest
    complete step that has one, dated by the oldest step of that run; (identity, that newest tag)."""
    ckpt_dir = os.path.join(run_dir, CKPT_DIR)
    done = [(tag, run_of(ckpt_dir, tag)) for _, tag, complete in reversed(list_steps(ckpt_dir)) if complete]
    run_id, newest = next(((rid, tag) for tag, rid in done if rid), (None, None))
    if run_id is None:
        return None
    first = [tag for tag, rid in done if rid == run_id][-1]
    started = datetime.datetime.fromtimestamp(os.path.getmtime(os.path.join(ckpt_dir, first)))
    return RunIdentity(run_id, name, started.isoformat(timespec="seconds"), socket.gethostname()), newest


def _replace_lost_identity(run_dir: str, name: str, problem: str) -> RunIdentity:
    """--resume with run.json missing or garbage: take the identity back from the checkpoints (their
    own steps stay this run's, pruned to train.keep_last as before), or start a new one when none
    records it (then the old steps are never pruned); say which. A garbage file is kept aside."""
    path = os.path.join(run_dir, RUN_FILE)
    found = recorded_identity(run_dir, name)
    steps = [tag for _, tag, complete in list_steps(os.path.join(run_dir, CKPT_DIR)) if complete]
    if found is not None:
        ident, tag = found
        say = (f"continuing run {ident.run_id}, the id recorded in the manifest of {tag}; run.json is written "
               f"again, and this run's old steps are pruned as before (train.keep_last)")
    else:
        ident = RunIdentity.new(name)
        say = (f"no checkpoint records a run id (old markers), so this is a new run {ident.run_id}; the existing "
               f"steps {steps} are not known to be its own and are never pruned" if steps else
               f"there is no checkpoint to continue either: new run id {ident.run_id}")
    if not steps and not os.path.lexists(path):
        return ident  # a --resume of nothing: it stops later, saying so
    if os.path.lexists(path):
        aside = f"{path}.unreadable-{datetime.datetime.now().strftime('%Y%m%dT%H%M%S%f')}"
        os.replace(path, aside)
        say = f"{say} (the old file is kept as {aside})"
    print(f"warning: {path} {problem}: {say}", file=sys.stderr, flush=True)
    return ident


def claim(run_dir: str, name: str, *, resume: bool, overwrite: bool) -> RunIdentity:
    """The identity this run writes under (rank 0 only, after :func:`check_start`): the existing one
    when resuming, a new one otherwise (``--overwrite`` first deletes the old run's checkpoints).
    Resuming without a readable run.json recovers it from the checkpoints (:func:`recorded_identity`)."""
    old, problem = _load_identity(run_dir)
    if resume and old is not None:
        return old
    if resume and not overwrite:
        ident = _replace_lost_identity(run_dir, name, problem)
        os.makedirs(run_dir, exist_ok=True)
        write_text_atomic(os.path.join(run_dir, RUN_FILE), json.dumps(asdict(ident), indent=1))
        return ident
    if overwrite:
        shutil.rmtree(os.path.join(run_dir, CKPT_DIR), ignore_errors=True)
        for f in RUN_OUTPUTS:
            if os.path.isfile(os.path.join(run_dir, f)):
                os.remove(os.path.join(run_dir, f))
    ident = RunIdentity.new(name) if not resume or old is None else old
    os.makedirs(run_dir, exist_ok=True)
    write_text_atomic(os.path.join(run_dir, RUN_FILE), json.dumps(asdict(ident), indent=1))
    return ident


def check_start(run_dir: str, *, resume: bool, overwrite: bool) -> None:
    """Read-only, on any rank or before launch: a new run must not land on another run's checkpoints."""
    if resume or overwrite:
        return
    newest = newest_complete(os.path.join(run_dir, CKPT_DIR))
    if newest is None:
        return
    old = read_identity(run_dir)
    who = f"run {old.run_id} (started {old.created} on {old.host})" if old else "an earlier run"
    raise RunOwnershipError(
        f"{run_dir} already holds {who} with checkpoints up to {newest}: continue it with --resume, start over "
        f"with --overwrite (deletes its checkpoints and results), or choose another name=")


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    started: str
    slurm_job: str = ""  # SLURM_JOB_ID of the holder: a requeued job keeps its id, on whichever node

    @property
    def stale(self) -> bool:
        """Its process is known to be gone (this host), it was an earlier incarnation of this very
        SLURM job (requeued, perhaps onto another node), or the lock file is torn."""
        if self.slurm_job and self.slurm_job == os.environ.get("SLURM_JOB_ID"):
            return True
        return self.pid == -1 or self.alive() is False

    def alive(self) -> bool | None:
        """True / False on this host; None when it runs elsewhere (cannot be checked from here)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def lock_holder(run_dir: str) -> LockHolder | None:
    try:
        with open(os.path.join(run_dir, LOCK_FILE)) as fh:
            return LockHolder(**json.load(fh))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):  # a torn lock file: its writer died while writing it
        return LockHolder("?", -1, "?")


def _busy(run_dir: str, holder: LockHolder) -> RunOwnershipError:
    return RunOwnershipError(
        f"{run_dir} is being written by PID {holder.pid} on {holder.host} (since {holder.started}); wait for it, "
        f"use another name=, or, if that process is gone, delete {os.path.join(run_dir, LOCK_FILE)}")


def check_unlocked(run_dir: str) -> None:
    """Before launch: fail early when a live process holds the run's lock."""
    holder = lock_holder(run_dir)
    if holder is not None and not holder.stale:
        raise _busy(run_dir, holder)


class RunLock:
    """Held by rank 0 for the whole run; ``release`` (or the process's end) frees it."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.run_dir = run_dir
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises when it is busy."""
        os.makedirs(self.run_dir, exist_ok=True)
        me = LockHolder(socket.gethostname(), os.getpid(), _now(), os.environ.get("SLURM_JOB_ID", ""))
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = lock_holder(self.run_dir)
                if holder is None:
                    continue  # released in between: try again
                if not holder.stale:
                    raise _busy(self.run_dir, holder) from None
                note = (f"took over the stale lock of {self.run_dir} (PID {holder.pid} on {holder.host}, "
                        f"since {holder.started}, is gone)")
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(asdict(me), fh)
            self.held = True
            return note
        raise _busy(self.run_dir, lock_holder(self.run_dir) or me)

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

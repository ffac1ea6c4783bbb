"""One campaign runner: a list of named ``msmoe`` runs, here one after the other or queued as SLURM
jobs through ``msmoe submit``; the scaling sweep (scaling/sweep.py) and the ablation
(scaling/ablation.py) only say which runs.

Every run is a child process started from the caller's folder, so the caller's relative paths
(``--config scale.yaml``, ``out_dir=runs/x``) mean what they meant to the caller; the project stays
importable through PYTHONPATH (parallel/launchenv.py ``with_on_path``). The command line comes from
the ``msmoe`` command that started the campaign (launcher/command.py ``msmoe_command``, handed down
as ``Campaign.command``). A run that fails raises ``Campaign.error`` with one line: the run, its exit
code, its last error line and the file holding its whole output.

  camp = Campaign(msmoe_command, log_dir="runs/scale", error=ScaleError, what="scale point")
  camp.run_all([Run("scale-weak-w1-ep1-e4", "weak world 1 ...", ("train", ...), nproc=1)])
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Command(Protocol):
    """launcher/command.py ``msmoe_command``: ``msmoe ARGS`` as an argv, under torchrun with ``nproc``."""

    def __call__(self, args: Sequence[str], *, nproc: int | None = None) -> list[str]: ...


@dataclass(frozen=True)
class Run:
    name: str  # names the run in progress lines, errors and its log file
    title: str  # the progress line after "[i/n]"
    args: tuple[str, ...]  # msmoe arguments, e.g. ("train", "--config", ...)
    nproc: int | None = None  # under torchrun with this many processes; None: msmoe itself


def last_error_line(output: str) -> str:
    """The line that says why: msmoe's own "msmoe: error: ..." if there is one, else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("msmoe: error:")]
    return (said or lines or ["(no output)"])[-1][:400]


@dataclass(frozen=True)
class Campaign:
    command: Command
    log_dir: str  # a failed run's whole output goes to <log_dir>/<name>.log
    error: type[Exception] = RuntimeError  # what a failed run raises
    what: str = "run"  # how a failed run is named: "scale point", "ablation run"

    def run(self, name: str, args: Sequence[str], *, nproc: int | None = None) -> str:
        """``msmoe ARGS`` from the caller's folder; -> its standard output. A non-zero exit raises
        ``error`` in one line."""
        cmd = self.command(list(args), nproc=nproc)
        proc = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            log = self._keep(name, cmd, proc)
            raise self.error(f"{self.what} {name} failed (exit {proc.returncode}): "
                             f"{last_error_line(proc.stdout + chr(10) + proc.stderr)} (its output: {log})")
        return proc.stdout

    def run_all(self, runs: Sequence[Run], *, finished: Callable[[Run], bool] | None = None,
                result: Callable[[Run, str], str] | None = None) -> None:
        """Each run in turn; one ``finished`` says is done is kept; ``result`` gives the line printed
        after a run (from the run and its output)."""
        for i, r in enumerate(runs, 1):
            if finished is not None and finished(r):
                print(f"[{i}/{len(runs)}] {r.name}: finished before, kept", flush=True)
                continue
            print(f"[{i}/{len(runs)}] {r.title}", flush=True)
            out = self.run(r.name, r.args, nproc=r.nproc)
            if result is not None:
                print("      " + result(r, out), flush=True)

    def submit(self, name: str, submit_args: Sequence[str], train_args: Sequence[str]) -> str:
        """``msmoe submit SUBMIT_ARGS -- TRAIN_ARGS``; -> its standard output (the job id last)."""
        return self.run(name, ["submit", *submit_args, "--", *train_args])

    def wait_for_jobs(self, jobs: dict[str, str], finished: Callable[[str], bool], job_log: Callable[[str, str], str],
                      poll_s: float) -> None:
        """Until every run of ``jobs`` (name -> SLURM job id) is ``finished``; a job that leaves the
        queue first raises ``error`` naming it and its log (``job_log(name, job)``)."""
        jobs = dict(jobs)
        while jobs:
            for name, job in list(jobs.items()):
                if finished(name):
                    print(f"      {name}: finished (job {job})", flush=True)
                    del jobs[name]
                elif not job_active(job) and not finished(name):
                    log = job_log(name, job)
                    tail = open(log, errors="replace").read() if os.path.isfile(log) else "(no log)"
                    raise self.error(f"{self.what} {name}: job {job} left the queue without finishing: "
                                     f"{last_error_line(tail)} (its log: {log})")
            if jobs:
                time.sleep(poll_s)

    def _keep(self, name: str, cmd: list[str], proc: subprocess.CompletedProcess) -> str:
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, f"{name}.log")
        with open(path, "w") as fh:
            fh.write(f"$ {' '.join(cmd)}\n(exit {proc.returncode})\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        return path


def job_active(job: str) -> bool:
    """Whether SLURM still holds the job (pending, running, requeued); False once it left the queue."""
    proc = subprocess.run(["squeue", "--noheader", "--jobs", job, "--format=%T"], capture_output=True, text=True)
    return proc.returncode == 0 and bool(proc.stdout.strip())


def _child_env() -> dict[str, str]:
    from parallel.launchenv import with_on_path

    return with_on_path(ROOT)

"""A real one-node SLURM cluster for the tests: munged + slurmctld + slurmd on this machine.

Needs root and Debian's slurmctld, slurmd, slurm-client and munge (``.ci/run`` installs them).
State, spool, logs and the config live in a temporary directory; ``SLURM_CONF`` points at it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time


ENABLE = "run .ci/system-deps as root to install SLURM (slurmctld slurmd slurm-client munge), then rerun"


def available() -> str | None:
    """None if a cluster can be started here, else why not and the command that enables the tests
    (pytest prints it in the summary: ``-rs`` in pyproject.toml's addopts)."""
    if os.geteuid() != 0:
        return "SLURM tests skipped: the SLURM daemons need root; as root, run .ci/system-deps to install SLURM, " \
               "then rerun the tests"
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
    if missing:
        return f"SLURM tests skipped: {' '.join(missing)} not installed; {ENABLE}"
    return None


class Cluster:
    def __init__(self, base: str, cpus: int | None = None):
        self.base = base
        self.host = socket.gethostname()
        self.cpus = cpus or os.cpu_count() or 2
        self.conf = os.path.join(base, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self.procs: list[subprocess.Popen] = []

    def _write_conf(self) -> None:
        for d in ("state", "spool", "log", "run"):
            os.makedirs(os.path.join(self.base, d), exist_ok=True)
        b = self.base
        port = _free_port_pair()
        text = f"""ClusterName=msmoe-test
SlurmctldHost={self.host}
SlurmctldPort={port}
SlurmdPort={port + 1}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=60
MinJobAge=600
NodeName={self.host} CPUs={self.cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as fh:
            fh.write(text)

    def start(self, timeout: float = 60) -> "Cluster":
        self._write_conf()
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            os.makedirs("/run/munge", exist_ok=True)
            if not os.path.exists("/etc/munge/munge.key"):  # the package normally makes one
                os.makedirs("/etc/munge", exist_ok=True)
                with open("/etc/munge/munge.key", "wb") as fh:
                    fh.write(os.urandom(1024))
                os.chmod("/etc/munge/munge.key", 0o400)
            subprocess.run(["munged", "--force"], check=True, env=self.env, capture_output=True)
        for cmd in (["slurmctld", "-D", "-i"], ["slurmd", "-D"]):
            log = open(os.path.join(self.base, "log", cmd[0] + ".stdout"), "w")
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))
            time.sleep(1.0)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return self
            time.sleep(1)
        raise RuntimeError(f"SLURM node did not come up (sinfo: {out!r}); logs in {self.base}/log:\n{self.logs()}")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr}")
        return proc

    def job_state(self, job: str) -> tuple[str, int]:
        """(state, restart count) from scontrol."""
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        fields = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
        return fields.get("JobState", "UNKNOWN"), int(fields.get("Restarts", "0"))

    def wait(self, job: str, timeout: float = 600, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                           "NODE_FAIL", "OUT_OF_MEMORY")) -> str:
        deadline = time.time() + timeout
        state = "UNKNOWN"
        while time.time() < deadline:
            state, _ = self.job_state(job)
            if state in states:
                return state
            time.sleep(2)
        raise TimeoutError(f"job {job} still {state} after {timeout} s")

    def logs(self) -> str:
        out = []
        for f in ("slurmctld.log", "slurmd.log"):
            p = os.path.join(self.base, "log", f)
            if os.path.exists(p):
                out.append(f"--- {f}\n" + open(p).read()[-3000:])
        return "\n".join(out)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port < 65000:
            with socket.socket() as s2:
                try:
                    s2.bind(("", port + 1))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair")

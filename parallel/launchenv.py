"""Which launcher started this process, and the torchrun command line, each written once.

torchrun, ``deepspeed`` and ``accelerate launch`` export RANK / WORLD_SIZE; mpirun (Open MPI,
MPICH, MVAPICH, PMIx) exports its own rank variable, from which parallel/dist.py fills the
torch ones through mpi4py.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
# set by some launcher in the processes it starts: a second launcher inside would nest
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", *MPI_RANK_VARS, "TORCHELASTIC_RUN_ID",
                 "ACCELERATE_MIXED_PRECISION")
# what torchrun forwards to its workers when the job is signalled (SLURM's warning is USR1)
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def with_on_path(folder: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default: this process's) whose PYTHONPATH starts with ``folder`` and
    keeps what the caller had after it: a child process started with it still sees the caller's
    packages (on the GPU node: the bundle in /tmp/msmoe-site). Empty entries are dropped (Python
    reads an empty entry as the current directory)."""
    env = dict(os.environ if environ is None else environ)
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != folder]
    env["PYTHONPATH"] = os.pathsep.join([folder, *kept])
    return env


def discover_launcher(environ: Mapping[str, str] | None = None) -> str:
    """"env" (torchrun / deepspeed / accelerate), "mpi" (mpirun) or "single" (no launcher)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    if any(v in env for v in MPI_RANK_VARS):
        return "mpi"
    return "single"


def launcher_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """The launcher variables present in ``environ`` (empty: no launcher started this process)."""
    env = os.environ if environ is None else environ
    return [v for v in LAUNCHER_VARS if v in env]


def node_size(world_size: int, environ: Mapping[str, str] | None = None) -> int:
    """Ranks per node: ``LOCAL_WORLD_SIZE`` as torchrun, the deepspeed launcher and accelerate set it
    (parallel/dist.py sets it under mpirun from the hosts' names); without it, one node of
    ``world_size`` ranks (a single process, or a launcher that does not say)."""
    env = os.environ if environ is None else environ
    raw = env.get("LOCAL_WORLD_SIZE", "").strip()
    if not raw:
        return world_size
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE={raw!r} (set by the launcher) must be a whole number >= 1 "
                         "(the processes on this node)")
    return int(raw)


def torchrun_command(nproc_per_node: int | str, target: Sequence[str], *, python: str | None = None,
                     nnodes: int | str = 1, node_rank: int | None = None, rdzv_endpoint: str | None = None,
                     rdzv_id: str | None = None, options: Sequence[str] = (),
                     runner: str = "torch.distributed.run") -> list[str]:
    """``python -m torch.distributed.run ... <target>``. One node without a rendezvous endpoint runs
    ``--standalone``; otherwise the c10d rendezvous at ``rdzv_endpoint`` (host:port). ``target`` is
    ``["-m", "module", args...]`` or ``[script, args...]``; ``options`` are further torchrun flags;
    ``runner``: the module that runs torchrun (torch's own unless a wrapper of it is given)."""
    cmd = [python or sys.executable, "-m", runner]
    if rdzv_endpoint is None:
        cmd += ["--standalone", f"--nproc_per_node={nproc_per_node}"]
    else:
        cmd += [f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}"]
        if node_rank is not None:
            cmd.append(f"--node_rank={node_rank}")
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
        if rdzv_id is not None:
            cmd.append(f"--rdzv_id={rdzv_id}")
    return [*cmd, *options, *target]

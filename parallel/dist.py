"""Start-up of the distributed world, whichever launcher started this process.

  torchrun / deepspeed / accelerate launch   set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
  mpirun / mpiexec (MPICH, Open MPI)         no RANK: the rank, size and local rank come from
                                             mpi4py, rank 0's host name is broadcast as
                                             MASTER_ADDR, and the env vars are set from them
  nothing (plain `python script.py`)         a world of one (MASTER_ADDR=127.0.0.1, a free port)

Then DeepSpeed's communication layer is initialised (it wraps torch.distributed), with NCCL
on CUDA and gloo on CPU unless told otherwise.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

from parallel.all_to_all import set_host_wait_timeout
from parallel.launchenv import discover_launcher
from parallel.nccl import apply_nccl_env, group_timeout_s



@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "env" (torchrun/deepspeed/accelerate), "mpi" or "single"
    backend: str
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_mpi() -> None:
    """Fill the torch.distributed env vars from MPI (mpi4py)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    host = socket.gethostname()
    hosts = comm.allgather(host)
    master = os.environ.get("MASTER_ADDR") or comm.bcast(socket.gethostbyname(host) if rank == 0 else None, root=0)
    port = os.environ.get("MASTER_PORT") or comm.bcast(str(_free_port()) if rank == 0 else None, root=0)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(hosts[:rank].count(host)),
        LOCAL_WORLD_SIZE=str(hosts.count(host)), MASTER_ADDR=str(master), MASTER_PORT=str(port),
    )


def init_distributed(backend: str | None = None, timeout_s: float = 300.0) -> WorldInfo:
    """Join (or create) the process group; safe to call twice."""
    import deepspeed

    from parallel.ds_ops import prepare_shm_op

    launcher = discover_launcher()
    if launcher == "mpi":
        _env_from_mpi()
    elif launcher == "single":
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        from parallel.devices import check_gpu_count

        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        # more local processes than GPUs would fail below with "invalid device ordinal"
        check_gpu_count(max(local_world, local_rank + 1), "--nproc_per_node", 'CUDA_VISIBLE_DEVICES="" to run on the CPU')
        torch.cuda.set_device(local_rank)
    if backend == "nccl":  # before the process group exists: see parallel/nccl.py
        apply_nccl_env()
        set_host_wait_timeout(timeout_s)
    if not torch.distributed.is_initialized():
        # our own rendezvous first (DeepSpeed adopts it): under torchrun every restart attempt gets
        # its own key space in the agent's store, so a restarted worker never reads a dead one's address
        timeout = timedelta(seconds=group_timeout_s(backend, timeout_s))
        torch.distributed.init_process_group(backend=backend, timeout=timeout, **_attempt_store(timeout))
        atexit.register(_destroy_at_exit)
    prepare_shm_op()  # DeepSpeed's CPU op: built once, a killed build's lock cleared (parallel/ds_ops.py)
    deepspeed.init_distributed(  # adopts the group above
        dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=group_timeout_s(backend, timeout_s))
    )
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return WorldInfo(
        torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, launcher,
        torch.distributed.get_backend(), device,
    )


def shutdown_distributed() -> None:
    """Leave the process group cleanly: every rank waits for the others, then the group is
    destroyed before the interpreter exits (a process that exits with the group's threads still
    running can abort with "terminate called without an active exception")."""
    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _attempt_store(timeout: timedelta) -> dict:
    """Under torchrun (agent store): the agent's TCPStore behind a prefix per restart attempt.

    torch's env:// rendezvous reuses keys across elastic restarts often enough that a restarted
    gloo group dials the dead workers' ports ("Connection refused", seen with torch 2.13); a
    prefix of our own per attempt rules that out. Elsewhere: plain env:// (rank 0 hosts the store)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return {}
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    base = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                      is_master=False, timeout=timeout)
    store = torch.distributed.PrefixStore(f"/msmoe/attempt_{attempt}/", base)
    return {"store": store, "rank": rank, "world_size": world}


def _destroy_at_exit() -> None:
    """No barrier here: a rank leaving on an error must not wait for the others."""
    try:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway; the group may already be broken
        pass


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_after_broken_collective(code: int) -> None:
    """Leave now, without tearing the group down: a peer died, and destroying a process group
    with a dead peer aborts the process ("terminate called without an active exception")."""
    _exit_now(code)


def leave_distributed(code: int, status: int | None = None) -> None:
    """End a process that joined a process group: on success (``code`` 0) every rank meets at a barrier
    and the group is destroyed; then the process exits at once with ``status`` (default: ``code``). Leaving through the
    interpreter's normal shutdown instead, a rank sometimes aborted in a C++ destructor
    ("terminate called without an active exception", about 1 run in 30 here) after its work was
    done, turning a finished run into a failed one. Returns if no group exists."""
    if not torch.distributed.is_initialized():
        return
    if code == 0:
        try:
            shutdown_distributed()
        except Exception as exc:  # noqa: BLE001 - the work is done; report and leave
            print(f"msmoe: warning: leaving the process group: {exc}", file=sys.stderr)
    atexit._run_exitfuncs()  # Python's exit handlers still run (temp files, logs); C++ teardown does not
    _exit_now(code if status is None else status)

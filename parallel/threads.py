"""Threads per worker process: the CPUs this node gave the job, shared by its local processes.

Order (the first that applies):
  1. ``train.threads`` > 0 in the config;
  2. ``OMP_NUM_THREADS`` in the environment (the user's, or the one a `msmoe submit` job script sets
     from its allocation);
  3. ``SLURM_CPUS_PER_TASK`` (the CPUs of the one task per node that runs the launcher) divided by the
     processes on this node (``LOCAL_WORLD_SIZE``);
  4. the CPUs this process may run on (its affinity mask, which a cgroup or ``taskset`` narrows, not
     the machine's core count) divided by the processes on this node.
"""

from __future__ import annotations

import os
from typing import Mapping


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(configured: int = 0, environ: Mapping[str, str] | None = None,
                       cpus: int | None = None) -> int:
    env = os.environ if environ is None else environ
    if configured > 0:
        return configured
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    slurm = env.get("SLURM_CPUS_PER_TASK", "").strip()
    total = int(slurm) if slurm.isdigit() and int(slurm) > 0 else (cpus if cpus is not None else available_cpus())
    return max(1, total // local)

"""Threads per worker (parallel/threads.py): the config, then the user's OMP_NUM_THREADS, then the SLURM
allocation over the node's processes, then the CPUs this process may use over the node's processes."""

from parallel.threads import available_cpus, threads_per_worker


def test_order_of_sources():
    assert threads_per_worker(3, {"OMP_NUM_THREADS": "7", "SLURM_CPUS_PER_TASK": "64"}) == 3
    assert threads_per_worker(0, {"OMP_NUM_THREADS": "7", "SLURM_CPUS_PER_TASK": "64"}) == 7
    assert threads_per_worker(0, {"SLURM_CPUS_PER_TASK": "64", "LOCAL_WORLD_SIZE": "8"}, cpus=999) == 8
    assert threads_per_worker(0, {"LOCAL_WORLD_SIZE": "4"}, cpus=16) == 4
    assert threads_per_worker(0, {"SLURM_CPUS_PER_TASK": "2", "LOCAL_WORLD_SIZE": "8"}) == 1  # never 0
    assert threads_per_worker(0, {"OMP_NUM_THREADS": "", "LOCAL_WORLD_SIZE": "1"}, cpus=6) == 6


def test_available_cpus_is_the_affinity_mask():
    import os

    assert available_cpus() == len(os.sched_getaffinity(0)) >= 1

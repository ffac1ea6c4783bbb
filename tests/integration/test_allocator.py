"""The host allocator (launcher/allocator.py): page faults of a step-like allocation pattern, tuned vs
system defaults."""

import os
import subprocess
import sys
import textwrap

import pytest

_HEAP = textwrap.dedent("""
    import os
    from launcher import allocator
    print(allocator.tune()["allocator"])
    import torch
    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    def heap_ranges():
        for line in open("/proc/self/maps"):
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(a, 16) for a in line.split()[0].split("-"))
                yield lo, hi
    live = [torch.ones(7 << 20) for _ in range(4)]  # four 28 MiB activations of one step
    addr = live[0].data_ptr()
    in_heap = any(lo <= addr < hi for lo, hi in heap_ranges())
    peak = rss_mib()
    del live  # the step ends
    print(in_heap, round(peak - rss_mib()))
""")


def _heap(mode: str) -> tuple[str, bool, float]:
    env = dict(os.environ, MSMOE_CPU_ALLOCATOR=mode)
    out = subprocess.run([sys.executable, "-c", _HEAP], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    desc, result = out.stdout.strip().splitlines()
    in_heap, freed = result.split()
    return desc, in_heap == "True", float(freed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt, /proc")
def test_tuned_allocator_keeps_step_memory_for_the_next_step():
    desc_sys, heap_sys, freed_sys = _heap("system")
    desc, heap, freed = _heap("tuned")
    assert "system defaults" in desc_sys and "glibc trim 1 GiB, mmap 32 MiB" in desc
    # System defaults: a fresh process maps each 28 MiB block on its own and unmaps it when
    # freed, so the next step faults 112 MiB back in page by page.
    assert not heap_sys and freed_sys > 100
    # Tuned: the blocks come from the heap and stay resident for the next step.
    assert heap and freed < 10

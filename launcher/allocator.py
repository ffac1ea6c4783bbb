"""Host memory allocator settings for CPU training: stop paying page faults every step.

PyTorch's CPU tensors come from glibc ``malloc``. By default glibc hands blocks of more than
a few MiB back to the kernel when they are freed (``munmap``, or trimming the heap top), so a
training step that frees its activations gets fresh pages next step and faults on every 4 KiB
of them (``msmoe bench layer`` prints the minor page faults per step of every contender).

``tune()`` (called by the ``msmoe`` command before torch is imported) sets, for this process:
  M_TRIM_THRESHOLD  1 GiB  - freed memory stays in the process for the next step
  M_MMAP_THRESHOLD  32 MiB - blocks up to 32 MiB (glibc's maximum) come from the reusable heap
The cost is resident memory: the process keeps its peak heap instead of shrinking between
steps. ``MSMOE_CPU_ALLOCATOR=system`` leaves glibc as the system has it.

Transparent huge pages for torch's blocks (torch's own ``THP_MEM_ALLOC_ENABLE=1``) are left
to the user: they remove the faults of blocks above 32 MiB (large maps), but they can make
small-image training slower, the kernel compacting memory to find huge pages (measure with
``make train`` both ways).
No torch import here: this runs before torch allocates anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_BYTES = 1 << 30
MMAP_BYTES = 32 << 20
ENV = "MSMOE_CPU_ALLOCATOR"

_state: dict[str, str] = {}


def tune() -> dict[str, str]:
    """Apply the settings above once per process; returns what was done (also :func:`describe`)."""
    if _state:
        return dict(_state)
    if os.environ.get(ENV, "tuned") == "system":
        _state["allocator"] = f"system defaults ({ENV}=system)"
        return dict(_state)
    done = []
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(TRIM_BYTES)) == 1
        ok = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(MMAP_BYTES)) == 1 and ok
        if ok:
            done.append("glibc trim 1 GiB, mmap 32 MiB")
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune this way
        pass
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        done.append("huge pages for blocks >= 2 MiB (THP_MEM_ALLOC_ENABLE=1)")
    _state["allocator"] = ", ".join(done) if done else "system defaults (no glibc mallopt here)"
    return dict(_state)


def describe() -> str:
    """One line for logs and benchmark headers."""
    return _state.get("allocator", "system defaults (not tuned)")

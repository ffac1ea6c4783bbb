"""Count the calls that would make the host wait for a GPU, on a machine without one.

On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` reports every device-to-host sync. On CPU
nothing syncs, so this counter wraps the operations that *would* sync on a CUDA tensor:

  reading values     item, tolist, numpy, cpu, bool(t), int(t), float(t), t.__index__
  data-dependent     nonzero / argwhere, masked_select, boolean-mask indexing t[mask],
  shapes             bincount, unique, repeat_interleave without ``output_size``

Only calls made *from project code* (the packages named in ``PROJECT``) on the thread that
entered the counter count, at the frame that made them, so the report names file:line. Library
internals (DeepSpeed's optimizer, torch itself) are not ours to count here; ``make gpu-check``
counts everything on a real GPU. Not counted either: ``reid/data.py``, which works on host
arrays before the batch is copied to the device (on a GPU those reads wait for nothing), and
a background data worker's thread.

    with SyncCounter() as syncs:
        run_one_step()
    assert syncs.total <= budget, syncs.report()
"""

from __future__ import annotations

import collections
import os
import sys
import threading

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = tuple(os.path.join(ROOT, p) + os.sep
                for p in ("common", "moe", "parallel", "reid", "launcher", "bench", "scaling", "gpucheck", "training"))
HOST_SIDE = (os.path.join(ROOT, "reid", "data.py"),)

_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero",
            "argwhere", "masked_select", "bincount", "unique")
_FUNCTIONS = ("nonzero", "argwhere", "masked_select", "bincount", "unique")


def _is_bool_index(idx) -> bool:
    if isinstance(idx, torch.Tensor):
        return idx.dtype == torch.bool
    if isinstance(idx, tuple):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)
    return False


class SyncCounter:
    """Context manager: counts would-be syncs per call site (``counts``) while active."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self._saved: list = []
        self.enabled = True
        self._thread = threading.get_ident()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        return "\n".join(f"{n:4d}  {site}" for site, n in self.counts.most_common())

    def _record(self, what: str, depth: int = 2) -> None:
        if not self.enabled:
            return
        frame = sys._getframe(depth)
        name = frame.f_code.co_filename
        if name.startswith(PROJECT) and name not in HOST_SIDE and threading.get_ident() == self._thread:
            self.counts[f"{os.path.relpath(name, ROOT)}:{frame.f_lineno} {what}"] += 1

    def _wrap(self, owner, attr: str, pred=None) -> None:
        orig = getattr(owner, attr)
        counter = self

        def wrapper(*args, **kwargs):
            if pred is None or pred(*args, **kwargs):
                counter._record(attr)
            return orig(*args, **kwargs)

        self._saved.append((owner, attr, orig))
        setattr(owner, attr, wrapper)

    def __enter__(self) -> "SyncCounter":
        self._thread = threading.get_ident()
        for m in _METHODS:
            self._wrap(torch.Tensor, m)
        for f in _FUNCTIONS:
            self._wrap(torch, f)
        self._wrap(torch.Tensor, "__getitem__", lambda self_, idx: _is_bool_index(idx))
        no_size = lambda *a, **kw: "output_size" not in kw and (  # noqa: E731
            isinstance(kw.get("repeats"), torch.Tensor) or (len(a) > 1 and isinstance(a[1], torch.Tensor)))
        self._wrap(torch, "repeat_interleave", no_size)
        self._wrap(torch.Tensor, "repeat_interleave", no_size)
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, orig in reversed(self._saved):
            setattr(owner, attr, orig)
        self._saved.clear()

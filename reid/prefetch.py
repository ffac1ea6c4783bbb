"""Feeding the training step: each step's batch made ahead of time by a background thread.

  StepBatches   the host batch of step s: rows of (seed, s) read from Arrow, normalised, mirrored,
                labels looked up from the sampler's pids (numpy, no device tensors), pinned when the
                device is CUDA. A pure function of s: the same batch whoever calls it, whenever.
  Prefetcher    runs ``make(s)`` for s = start, start+1, ... in one daemon thread, ``depth`` steps
                ahead; ``get(s)`` hands them out in order (a request for another step restarts it
                there: a resumed run), re-raises a worker error in the caller with its message, and
                ``close()`` stops and joins the thread.
  BatchFeed     the two together, plus the copy to the device (``non_blocking`` from pinned memory)
                and the bf16 cast (on the device after the copy: half the work of a host-side cast
                and bit-identical, since both round to nearest even).

Why a thread and not a DataLoader: the work is a pyarrow ``take`` and a few numpy/torch ops that
release the GIL, the batch is a few MB, and worker processes would fork a process that already
holds a process group and DeepSpeed state. ``train.prefetch: 0`` makes the batch in the step itself.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import numpy as np
import torch

from reid.data import Batch, PKSampler, fetch

T = TypeVar("T")
POLL_S = 0.5  # how often a waiting get()/put() looks at whether the other side is still there


@dataclass(frozen=True)
class StepBatch:
    """One step's batch and its class labels [B] (int64), on the host or on the device."""

    batch: Batch
    labels: torch.Tensor


def class_labels(classes: np.ndarray, pids: np.ndarray) -> np.ndarray:
    """Index of each pid in the sorted array ``classes`` (the classifier's label), vectorised."""
    pos = np.searchsorted(classes, pids)
    pos = np.minimum(pos, len(classes) - 1)
    if not np.array_equal(classes[pos], pids):
        missing = sorted(set(np.asarray(pids).tolist()) - set(np.asarray(classes).tolist()))[:5]
        raise ValueError(f"pid(s) {missing} are not training identities")
    return pos.astype(np.int64)


class StepBatches:
    """The host-side batch of a training step, from (seed, step) alone (see PKSampler)."""

    def __init__(self, split, sampler: PKSampler, pin: bool = False, dtype: torch.dtype | None = None):
        self.split, self.sampler, self.pin, self.dtype = split, sampler, pin, dtype
        self.classes = np.unique(sampler.pids)  # label i = the i-th smallest training pid

    def __call__(self, step: int) -> StepBatch:
        idx = self.sampler.indices(step)
        b = fetch(self.split, idx, self.sampler.flips(step))
        labels = torch.from_numpy(class_labels(self.classes, self.sampler.pids[idx]))
        if self.dtype is not None and self.dtype != b.rgb.dtype:
            b = Batch(b.rgb.to(self.dtype), b.nir.to(self.dtype), b.tir.to(self.dtype), b.pid, b.camid)
        if self.pin:
            b = Batch(*(t.pin_memory() for t in (b.rgb, b.nir, b.tir, b.pid, b.camid)))
            labels = labels.pin_memory()
        return StepBatch(b, labels)


class _Failed:
    def __init__(self, step: int, exc: BaseException):
        self.step, self.exc = step, exc


class Prefetcher(Generic[T]):
    """``make(s)`` for consecutive steps, computed ``depth`` steps ahead in a daemon thread.

    ``get(s)`` returns ``make(s)``; steps must be asked for in order, and a request for any other
    step than the next one restarts the thread at that step. ``end``: the first step not made.
    ``depth`` 0: no thread, ``get(s)`` calls ``make(s)`` itself.
    """

    def __init__(self, make: Callable[[int], T], depth: int, end: int | None = None, name: str = "msmoe-prefetch",
                 on_start: Callable[[], None] | None = None):
        if depth < 0:
            raise ValueError(f"prefetch depth={depth} must be >= 0")
        self.make, self.depth, self.end, self.name, self.on_start = make, depth, end, name, on_start
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._next = 0  # the step the next get() is expected to ask for

    # -------------------------------------------------------------- main side
    def get(self, step: int) -> T:
        if self.depth == 0:
            return self.make(step)
        if self._thread is None or step != self._next:
            self._start(step)
        while True:
            try:
                got_step, item = self._queue.get(timeout=POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"the batch prefetch thread stopped before step {step}") from None
        self._next = step + 1
        if isinstance(item, _Failed):
            self.close()
            raise item.exc  # the worker's own exception (type, message and traceback)
        assert got_step == step, (got_step, step)
        return item

    def close(self) -> None:
        """Stop the thread and wait for it (a few tenths of a second at most)."""
        t = self._thread
        if t is None:
            return
        self._stop.set()
        while t.is_alive():  # unblock a put() waiting for room
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.05)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self, step: int) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._next = step
        self._thread = threading.Thread(target=self._work, args=(step, self._stop, self._queue), name=self.name,
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ worker side
    def _work(self, step: int, stop: threading.Event, q: queue.Queue) -> None:
        started = self.on_start is None
        while not stop.is_set() and (self.end is None or step < self.end):
            try:
                if not started:  # once per thread
                    self.on_start()
                    started = True
                item = self.make(step)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread as is
                item = _Failed(step, exc)
            while not stop.is_set():
                try:
                    q.put((step, item), timeout=POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failed):
                return
            step += 1


class BatchFeed:
    """What the trainer asks for each step: ``get(step)`` -> StepBatch on ``device`` in ``dtype``."""

    def __init__(self, split, sampler: PKSampler, device: torch.device, dtype: torch.dtype, depth: int,
                 end: int | None = None):
        cuda = device.type == "cuda"
        self.device, self.dtype, self.cuda = device, dtype, cuda
        # on CUDA: pinned fp32 on the host, cast after the copy; on CPU the host batch is the batch
        self.batches = StepBatches(split, sampler, pin=cuda, dtype=None if cuda else dtype)
        # the CUDA device is per thread: pin (cudaHostAlloc) under this rank's GPU, not GPU 0
        on_start = (lambda: torch.cuda.set_device(device)) if cuda else None
        self.prefetcher: Prefetcher[StepBatch] = Prefetcher(self.batches, depth, end, on_start=on_start)

    def get(self, step: int) -> StepBatch:
        sb = self.prefetcher.get(step)
        if not self.cuda:
            return sb
        b = sb.batch.to(self.device, non_blocking=True)
        if self.dtype != b.rgb.dtype:
            b = Batch(b.rgb.to(self.dtype), b.nir.to(self.dtype), b.tir.to(self.dtype), b.pid, b.camid)
        return StepBatch(b, sb.labels.to(self.device, non_blocking=True))

    def close(self) -> None:
        self.prefetcher.close()

"""N simulated ranks inside one process, for unit tests of code that calls collectives.

No subprocess, no torchrun, no process group: :func:`run_ranks` runs ``fn(rank, group)`` for
rank 0..N-1, each in a thread of its own, while ``torch.distributed``'s collectives are replaced
by the :class:`FakeGroup`'s, which hand buffers from thread to thread at a barrier:

  all_to_all_single  rank r receives, from every rank s in order, the r-th split of s's input
  all_reduce         sum or max of every rank's tensor, written into each (in place)
  all_gather         every rank's tensor, in rank order
  get_rank / get_world_size / get_process_group_ranks / get_backend   of the fake group

Every collective is one exchange: each rank posts what it sends, all wait, each takes what it
receives, all wait again (so nobody overwrites a buffer that is still being read). Autograd's
backward of a CPU graph runs in the thread that calls ``backward()``, so the backward
all-to-all of a rank is that rank's too. A rank that raises breaks the barrier: the others
fail at once instead of hanging, and the first error is re-raised.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.distributed as dist

from parallel.groups import ExpertGroup

_PATCHED = ("all_to_all_single", "all_reduce", "all_gather", "get_rank", "get_world_size",
            "get_process_group_ranks", "get_backend")


class _DoneWork:
    """What an ``async_op=True`` collective returns: already finished."""

    def wait(self, timeout=None) -> bool:
        return True


class FakeGroup:
    """A process group of ``size`` ranks that are threads of this process."""

    def __init__(self, size: int, timeout_s: float = 60.0):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout_s)
        self.posted: list[Any] = [None] * size
        self._local = threading.local()
        self.calls: list[str] = []  # names of the collectives rank 0 entered, in order

    @property
    def rank(self) -> int:
        return self._local.rank

    def _exchange(self, name: str, value, take: Callable[[list], Any]):
        """Post ``value``, wait for every rank, ``take`` from all posts, wait again."""
        if self.rank == 0:
            self.calls.append(name)
        self.posted[self.rank] = value
        self.barrier.wait()
        out = take(list(self.posted))
        self.barrier.wait()
        return out

    # ---- the collectives, with torch.distributed's signatures --------------------------------
    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        n, me = self.size, self.rank
        send = input_split_sizes or [input.shape[0] // n] * n
        recv = output_split_sizes or [output.shape[0] // n] * n
        parts = list(input.split(send))

        def take(posted):
            got = [posted[src][me] for src in range(n)]
            if [g.shape[0] for g in got] != list(recv):
                raise RuntimeError(f"rank {me} expected {recv} rows, the ranks sent {[g.shape[0] for g in got]}")
            output.copy_(torch.cat(got))

        self._exchange("all_to_all_single", parts, take)
        return _DoneWork() if async_op else None

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        def take(posted):
            stacked = torch.stack(posted)
            tensor.copy_(stacked.amax(0) if op == dist.ReduceOp.MAX else stacked.sum(0))

        self._exchange("all_reduce", tensor.clone(), take)
        return _DoneWork() if async_op else None

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        def take(posted):
            for dst, src in zip(tensor_list, posted):
                dst.copy_(src)

        self._exchange("all_gather", tensor.clone(), take)
        return _DoneWork() if async_op else None

    def get_rank(self, group=None) -> int:
        return self.rank

    def get_world_size(self, group=None) -> int:
        return self.size

    def get_process_group_ranks(self, group=None) -> list[int]:
        return list(range(self.size))

    def get_backend(self, group=None) -> str:
        return "gloo"


@contextmanager
def faked(group: FakeGroup):
    """``torch.distributed``'s collectives replaced by ``group``'s while the block runs."""
    saved = {name: getattr(dist, name) for name in _PATCHED}
    for name in _PATCHED:
        setattr(dist, name, getattr(group, name))
    try:
        yield group
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def run_ranks(size: int, fn: Callable[[int, FakeGroup], Any]) -> list[Any]:
    """``[fn(0, g), ..., fn(size - 1, g)]``, the ranks run concurrently over one :class:`FakeGroup`."""
    group = FakeGroup(size)
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        group._local.rank = rank
        try:
            results[rank] = fn(rank, group)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            errors.append(exc)
            group.barrier.abort()

    with faked(group):
        threads = [threading.Thread(target=body, args=(r,), name=f"fake-rank-{r}") for r in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if errors:
        raise (real or errors)[0]
    return results


def expert_group(group: FakeGroup, rank: int, num_experts: int) -> ExpertGroup:
    """The :class:`ExpertGroup` of ``rank`` over the fake group: E experts, E / N on each rank."""
    per_rank = num_experts // group.size
    return ExpertGroup(group=group, size=group.size, rank=rank, ranks=tuple(range(group.size)),
                       num_experts=num_experts, num_local_experts=per_rank, first_expert=rank * per_rank,
                       device=torch.device("cpu"))

"""All-to-all with autograd, and the byte counter every exchange reports to.

Legend: R rows this rank sends, U rows it receives, D bytes-per-row payload width.
The backward of an all-to-all is the same all-to-all on the gradient with the split sizes
swapped (what was sent is received back), so the function is symmetric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from common.errors import UserError


@dataclass
class CommCounter:
    """Bytes moved by all-to-alls since the last reset (payload rows only, not the counts).

    total_bytes:      every row handed to the all-to-all, including rows kept on this rank
    offrank_bytes:    rows that actually leave this rank
    cross_node_bytes: rows sent to a rank of another node (nodes of ``node_size`` consecutive
                      global ranks; 0 = not counted)
    calls:            number of payload all-to-alls (forward and backward)
    """

    total_bytes: int = 0
    offrank_bytes: int = 0
    cross_node_bytes: int = 0
    calls: int = 0
    node_size: int = 0
    by_direction: dict = field(default_factory=lambda: {"forward": 0, "backward": 0})

    def record(self, x: torch.Tensor, send_splits: list[int], self_index: int, direction: str,
               ranks: list[int] | None = None) -> None:
        """``ranks``: global rank of each member of the group (needed to count node crossings)."""
        row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
        total = sum(send_splits) * row_bytes
        self.total_bytes += total
        self.offrank_bytes += total - send_splits[self_index] * row_bytes
        if self.node_size and ranks is not None:
            me = ranks[self_index] // self.node_size
            self.cross_node_bytes += sum(n for n, r in zip(send_splits, ranks) if r // self.node_size != me) * row_bytes
        self.by_direction[direction] += total
        self.calls += 1

    def reset(self) -> None:
        self.total_bytes = self.offrank_bytes = self.cross_node_bytes = self.calls = 0
        self.by_direction = {"forward": 0, "backward": 0}


class CollectiveError(UserError, RuntimeError):
    """A collective failed or timed out: some rank of the group died or stopped calling it."""


_host_wait_s: float | None = None  # NCCL: see parallel/nccl.py; None on gloo (it raises in the caller itself)


def set_host_wait_timeout(seconds: float | None) -> None:
    """How long a ``host_reads`` collective is waited for in the calling thread before it fails
    (``train.collective_timeout_s`` on NCCL; set by ``parallel.dist.init_distributed``)."""
    global _host_wait_s
    _host_wait_s = seconds


def collective(name: str, fn, *args, host_reads: bool = False, **kwargs):
    """Run ``fn`` (a torch.distributed collective); a failure or timeout is re-raised naming it.

    ``host_reads``: the caller reads the result on the host right after (split sizes), so waiting
    for it here costs nothing; on NCCL the wait then has a timeout and fails in this thread, named,
    instead of leaving the rank blocked until the watchdog ends the process."""
    try:
        if host_reads and _host_wait_s is not None:
            work = fn(*args, async_op=True, **kwargs)
            if work is not None and work.wait(timedelta(seconds=_host_wait_s)) is False:
                raise RuntimeError(f"Timed out after {_host_wait_s:g} s waiting for the other ranks")
            return None
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CollectiveError(
            f"collective '{name}' failed on rank {dist.get_rank()}: another rank died or stopped calling it "
            f"(process-group timeout: train.collective_timeout_s). Cause: {first}") from exc


def exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
             name: str = "all-to-all", host_reads: bool = False) -> torch.Tensor:
    """Plain all_to_all_single of rows: [sum(send), ...] -> [sum(recv), ...]."""
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    collective(name, dist.all_to_all_single, out, x.contiguous(), output_split_sizes=recv_splits,
               input_split_sizes=send_splits, group=group, host_reads=host_reads)
    return out


class AllToAll(torch.autograd.Function):
    """Differentiable all-to-all of rows; counts the bytes both ways."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, counter: CommCounter, self_index: int, ranks):  # noqa: D102
        ctx.splits = (send_splits, recv_splits)
        ctx.group, ctx.counter, ctx.self_index, ctx.ranks = group, counter, self_index, ranks
        counter.record(x, send_splits, self_index, "forward", ranks)
        return exchange(x, send_splits, recv_splits, group, "all-to-all of patch rows (forward)")

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        send_splits, recv_splits = ctx.splits
        ctx.counter.record(g, recv_splits, ctx.self_index, "backward", ctx.ranks)
        return exchange(g.contiguous(), recv_splits, send_splits, ctx.group,
                        "all-to-all of patch-row gradients (backward)"), None, None, None, None, None, None


def all_to_all_rows(x, send_splits, recv_splits, group, counter: CommCounter, self_index: int,
                    ranks: list[int] | None = None) -> torch.Tensor:
    return AllToAll.apply(x, send_splits, recv_splits, group, counter, self_index, ranks)

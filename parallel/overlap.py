"""A static plan's dispatch, experts and combine pipelined in chunks of local experts, the
all-to-alls asynchronous (``overlap_chunks: n``): chunk i+1's rows are in flight while the experts
compute chunk i, and chunk i's outputs travel back while chunk i+1 computes; forward and backward.

Legend: P ranks in the EP group, El local experts, n chunks of Ec = El / n local experts each,
C rows per expert from every rank (the static plan's capacity), D = L * Ch one patch row.

The plan's rows, sorted by global expert, are [P, El, C] (destination rank, its local expert,
slot). Chunk j takes local experts j*Ec .. (j+1)*Ec - 1 of every rank: [P, Ec, C] rows, one
all-to-all of Ec*C rows per peer -> [P source, Ec, C] -> expert-major [Ec, P*C] -> the experts
(only chunk j's rows; the other local experts get no rows) -> back by the reverse all-to-all. The
collectives are torch's functional ones (``all_to_all_single_autograd``): issued when called,
waited for when their result is first used, differentiable, their backward asynchronous as well,
so every chunk's transfer is issued before the first chunk computes. Each row meets the same
expert weights as in the one-shot exchange; only the matmuls' grouping differs (the result is
equal to it within float rounding; bit for bit where the kernels do not depend on the row count).
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as fc

from moe.units import take_units
from parallel.all_to_all import CommCounter


class _CountBackward(torch.autograd.Function):
    """Identity; its backward records the gradient rows the all-to-all's backward sends."""

    @staticmethod
    def forward(ctx, x, counter: CommCounter, splits: list, self_index: int, ranks):  # noqa: D102
        ctx.args = (counter, splits, self_index, ranks)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        counter, splits, self_index, ranks = ctx.args
        counter.record(g, splits, self_index, "backward", ranks)
        return g, None, None, None, None


def _exchange(rows_RD: torch.Tensor, per_peer: int, ep, counter: CommCounter) -> torch.Tensor:
    """Equal splits of ``per_peer`` rows each way, asynchronous, counted both ways."""
    splits = [per_peer] * ep.size
    counter.record(rows_RD, splits, ep.rank, "forward", ep.ranks)
    out = fc.all_to_all_single_autograd(rows_RD.contiguous(), splits, splits, ep.group)
    return _CountBackward.apply(out, counter, splits, ep.rank, ep.ranks)


def pipelined(units_NLC, plan, experts, ep, counter: CommCounter, chunks: int) -> torch.Tensor:
    """The rows of static ``plan`` through this EP group's experts in ``chunks`` pipelined chunks:
    -> the experts' outputs back in plan row order [R, L, C] (what ``combine`` returns)."""
    p, el, c = ep.size, ep.num_local_experts, plan.static_capacity
    if el % chunks:
        raise ValueError(f"overlap_chunks={chunks} must divide the {el} experts of each rank")
    ec = el // chunks
    _, l, ch = units_NLC.shape
    d = l * ch
    rows = take_units(units_NLC, plan.unit_of_row).reshape(p, el, c, d)
    sent = [_exchange(rows[:, j * ec:(j + 1) * ec].reshape(-1, d), ec * c, ep, counter) for j in range(chunks)]
    back = []
    for j, recv in enumerate(sent):  # recv: [P source, Ec, C, D]
        x = recv.reshape(p, ec, c, d).transpose(0, 1).reshape(ec * p * c, l, ch)  # expert-major
        counts = torch.zeros(el, dtype=torch.long, device=x.device)
        counts[j * ec:(j + 1) * ec] = p * c
        host = [p * c if j * ec <= e < (j + 1) * ec else 0 for e in range(el)]
        y = experts(x, counts, host).reshape(ec, p, c, d).transpose(0, 1).reshape(-1, d)
        back.append(_exchange(y, ec * c, ep, counter).reshape(p, ec, c, d))
    return torch.cat(back, dim=1).reshape(p * el * c, l, ch)

"""Row gathers whose backward is a scatter-add, not an accumulating index_put.

``x[idx]`` on a [N, ...] tensor differentiates through ``index_put_(accumulate=True)``, which
on CPU runs element by element: for the rows PatchMoE moves (whole P*P*C patches) and the
per-row expert biases it was the largest cost after the matmuls. ``index_add_`` does the same
sum row by row, vectorised (about 10-20x faster on CPU for these shapes).
"""

from __future__ import annotations

import torch


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(idx)
        ctx.rows = x.shape[0]
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: D102
        (idx,) = ctx.saved_tensors
        return g.new_zeros((ctx.rows, *g.shape[1:])).index_add_(0, idx, g), None


def gather_rows(x_N: torch.Tensor, idx_R: torch.Tensor) -> torch.Tensor:
    """x[idx] along dim 0: [N, ...] -> [R, ...]; gradients of repeated rows are summed."""
    if not x_N.requires_grad:
        return x_N.index_select(0, idx_R)
    return _GatherRows.apply(x_N, idx_R)

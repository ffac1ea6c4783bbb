"""Row gathers whose backward is a scatter-add, not an accumulating index_put.

``x[idx]`` on a [N, ...] tensor differentiates through ``index_put_(accumulate=True)``, which
on CPU runs element by element: for the rows PatchMoE moves (whole P*P*C patches) and the
per-row expert biases it was the largest cost after the matmuls. ``index_add_`` does the same
sum row by row, vectorised.

Low precision: an expert's bias or LayerNorm gradient is the sum of thousands of rows. Summed
into a bf16 buffer, each addition rounds to 8 bits of mantissa and the sum stops moving once
it is ~256x a row's size. bf16/fp16 gradients are therefore summed into an fp32 buffer (in
chunks of rows, so the fp32 copy of the gradient stays small) and rounded once at the end.
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
        return scatter_add_rows(g, idx, ctx.rows), None


LOW_PRECISION = (torch.bfloat16, torch.float16)
CHUNK_ELEMENTS = 1 << 24  # fp32 elements converted at a time (64 MiB)


def scatter_add_rows(g_R: torch.Tensor, idx_R: torch.Tensor, rows: int) -> torch.Tensor:
    """out[idx[r]] += g[r]: [R, ...] -> [rows, ...], accumulated in fp32 for bf16/fp16 ``g``."""
    if g_R.dtype not in LOW_PRECISION:
        return g_R.new_zeros((rows, *g_R.shape[1:])).index_add_(0, idx_R, g_R)
    acc = torch.zeros((rows, *g_R.shape[1:]), dtype=torch.float32, device=g_R.device)
    per_row = max(1, g_R[0].numel()) if g_R.shape[0] else 1
    step = max(1, CHUNK_ELEMENTS // per_row)
    for start in range(0, g_R.shape[0], step):  # shapes only: no host read
        acc.index_add_(0, idx_R[start:start + step], g_R[start:start + step].float())
    return acc.to(g_R.dtype)


def gather_rows(x_N: torch.Tensor, idx_R: torch.Tensor) -> torch.Tensor:
    """x[idx] along dim 0: [N, ...] -> [R, ...]; gradients of repeated rows are summed."""
    if not x_N.requires_grad:
        return x_N.index_select(0, idx_R)
    return _GatherRows.apply(x_N, idx_R)

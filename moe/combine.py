"""Weighted sum of each unit's K expert outputs when every slot has a row (dropless top-k).

Legend: N units, K slots per unit, R = N*K rows (plan order, sorted by expert), J output parts,
D values per part. A part is a whole unit (J = N, D = L*C) or, when the output goes straight
into the [B, H, W, C] map, one strip of P points (J = N*P, D = P*C; see ``moe.units.PatchView``).

  forward   Y_JKD = rows[src_JK]                 one gather of the rows into slot order
            out_JD = w_J1K @ Y_JKD               one batched matmul (reads Y once, writes out once)
  backward  dw_JK = g_J1D @ Y_JKD^T              one batched matmul (summed over a unit's parts)
            d_rows = w[slot] * g[part]           one gather, scaled in place

The general path (``index_add`` of weighted rows, :func:`moe.dispatch.unpermute`) makes a
weighted copy of every row and differentiates through two elementwise products, and needs an
unpatchify copy after it; on CPU those passes were most of the combine step's cost.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from moe.units import PatchGrid


class _SlotSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_RD, weights_NK, src_JK, unit_of_J):  # noqa: D102
        j, k = src_JK.shape
        d = rows_RD.shape[1]  # not -1: a rank with no patches has j = 0
        y_JKD = rows_RD.index_select(0, src_JK.reshape(-1)).view(j, k, d)
        w_JK = weights_NK if unit_of_J is None else weights_NK.index_select(0, unit_of_J)
        out_J1D = torch.bmm(w_JK.to(rows_RD.dtype).unsqueeze(1), y_JKD)
        ctx.save_for_backward(y_JKD, w_JK, src_JK, unit_of_J)
        ctx.num_units = weights_NK.shape[0]
        return out_J1D.view(j, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_JD):  # noqa: D102
        y_JKD, w_JK, src_JK, unit_of_J = ctx.saved_tensors
        j, k = src_JK.shape
        g_JD = g_JD.contiguous()
        d_rows = d_w = None
        if ctx.needs_input_grad[1]:
            # [J,1,D] @ [J,D,K]: row-vector times matrix; the [J,K,D] @ [J,D,1] form runs as
            # J separate matrix-vector products and was 3-8x slower on CPU.
            d_w = torch.bmm(g_JD.unsqueeze(1), y_JKD.transpose(1, 2)).view(j, k).to(w_JK.dtype)
            if unit_of_J is not None:
                d_w = d_w.new_zeros(ctx.num_units, k).index_add_(0, unit_of_J, d_w)
        if ctx.needs_input_grad[0]:
            slot_of_row = _inverse(src_JK.reshape(-1))
            w_R = w_JK.reshape(-1).index_select(0, slot_of_row).to(g_JD.dtype)
            d_rows = g_JD.index_select(0, slot_of_row // k).mul_(w_R.unsqueeze(1))
        return d_rows, d_w, None, None


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation of 0..n-1: inv[perm[i]] = i."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.shape[0], device=perm.device)
    return inv


def slot_sum(rows_RD: torch.Tensor, weights_NK: torch.Tensor, slot_of_row: torch.Tensor) -> torch.Tensor:
    """out[n] = sum_k weights[n, k] * rows[row of slot (n, k)]: [R, D] -> [N, D], R = N*K."""
    n, k = weights_NK.shape
    if rows_RD.shape[0] != n * k:
        raise ValueError(f"slot_sum needs a row for every slot: {rows_RD.shape[0]} rows for {n}x{k} slots")
    return _SlotSum.apply(rows_RD.contiguous(), weights_NK, _inverse(slot_of_row).view(n, k), None)


def slot_sum_to_map(rows_RLC: torch.Tensor, weights_NK: torch.Tensor, slot_of_row: torch.Tensor,
                    grid: PatchGrid) -> torch.Tensor:
    """:func:`slot_sum` written straight into the unpadded map: rows [R, L, C] -> [B, H, W, C]."""
    n, k = weights_NK.shape
    r, l, c = rows_RLC.shape
    if r != n * k or grid.padded or grid.num_units != n:
        raise ValueError("slot_sum_to_map needs a row for every slot of an unpadded grid")
    p, nw = grid.patch, grid.n_w
    dev = slot_of_row.device
    strip_J = torch.arange(n * p, device=dev)
    unit_of_J = strip_J // (p * nw) * nw + strip_J % nw  # strip (bh*P + r)*nw + j -> unit bh*nw + j
    r_of_J = strip_J // nw % p
    row_of_slot_NK = _inverse(slot_of_row).view(n, k)
    src_JK = row_of_slot_NK.index_select(0, unit_of_J) * p + r_of_J[:, None]
    out = _SlotSum.apply(rows_RLC.contiguous().view(r * p, p * c), weights_NK, src_JK, unit_of_J)
    return out.view(grid.batch, grid.height, grid.width, c)

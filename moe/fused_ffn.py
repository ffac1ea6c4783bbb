"""FFN experts (Linear - GELU - Linear) as one autograd function: per-expert GEMMs, bias fused.

Legend: T rows sorted by expert, C in/out channels, F hidden width, E local experts,
n_e rows of expert e (host integers; they slice T into E contiguous blocks).

Why: the grouped-matmul path adds each row's expert bias as a separate gather + add and lets
autograd keep its own copies; on CPU those passes over [T, F] cost as much as the routing.
Here every block is one ``addmm`` with its expert's bias (as ``nn.Linear`` does for the dense
FFN), written straight into a [T, F] / [T, C] buffer, and the backward is written out:

  forward   h_e = x_e W1_e + b1_e     a = gelu(h)     y_e = a_e W2_e + b2_e
  backward  da_e = dy_e W2_e^T        dW2_e = a_e^T dy_e      db2_e = sum_rows dy_e
            dh = gelu'(h) * da        dx_e = dh_e W1_e^T      dW1_e = x_e^T dh_e   db1_e = sum_rows dh_e

Same multiply-adds as the dense FFN of hidden width F over T rows; an expert with no rows gets
zero gradients. Needs the block sizes on the host (one device sync on GPUs, free on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _blocks(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


class _ExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TC, w1_ECF, b1_EF, w2_EFC, b2_EC, counts):  # noqa: D102
        t = x_TC.shape[0]
        h_TF = x_TC.new_empty(t, w1_ECF.shape[2])
        y_TC = x_TC.new_empty(t, w2_EFC.shape[2])
        for e, rows in _blocks(counts):
            torch.addmm(b1_EF[e], x_TC[rows], w1_ECF[e], out=h_TF[rows])
        a_TF = F.gelu(h_TF)
        for e, rows in _blocks(counts):
            torch.addmm(b2_EC[e], a_TF[rows], w2_EFC[e], out=y_TC[rows])
        ctx.save_for_backward(x_TC, h_TF, a_TF, w1_ECF, w2_EFC)
        ctx.counts = counts
        return y_TC

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_TC):  # noqa: D102
        x_TC, h_TF, a_TF, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        dy_TC = dy_TC.contiguous()
        da_TF = torch.empty_like(h_TF)
        dw1 = torch.zeros_like(w1) if need_w1 else None
        dw2 = torch.zeros_like(w2) if need_w2 else None
        db1 = w1.new_zeros(w1.shape[0], w1.shape[2]) if need_b1 else None
        db2 = w2.new_zeros(w2.shape[0], w2.shape[2]) if need_b2 else None
        for e, rows in _blocks(ctx.counts):
            torch.mm(dy_TC[rows], w2[e].t(), out=da_TF[rows])
            if need_w2:
                torch.mm(a_TF[rows].t(), dy_TC[rows], out=dw2[e])
            if need_b2:
                torch.sum(dy_TC[rows], 0, out=db2[e])
        del a_TF
        dh_TF = torch.ops.aten.gelu_backward.grad_input(da_TF, h_TF, grad_input=da_TF)  # in place
        del h_TF
        dx_TC = torch.empty_like(x_TC) if need_x else None
        for e, rows in _blocks(ctx.counts):
            if need_x:
                torch.mm(dh_TF[rows], w1[e].t(), out=dx_TC[rows])
            if need_w1:
                torch.mm(x_TC[rows].t(), dh_TF[rows], out=dw1[e])
            if need_b1:
                torch.sum(dh_TF[rows], 0, out=db1[e])
        return dx_TC, dw1, db1, dw2, db2, None


def expert_ffn(x_TC: torch.Tensor, w1_ECF: torch.Tensor, b1_EF: torch.Tensor, w2_EFC: torch.Tensor,
               b2_EC: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-expert Linear-GELU-Linear over row blocks of ``counts``: [T, C] -> [T, C_out]."""
    if x_TC.shape[0] != sum(counts):
        raise ValueError(f"expert_ffn: {x_TC.shape[0]} rows but the counts add up to {sum(counts)}")
    return _ExpertFFN.apply(x_TC.contiguous(), w1_ECF, b1_EF, w2_EFC, b2_EC, list(counts))

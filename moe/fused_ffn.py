"""FFN experts (Linear - GELU - Linear) as one autograd function: batched GEMMs, bias fused.

Legend: T rows sorted by expert, C in/out channels, F hidden width, E local experts,
n_e rows of expert e (host integers; they slice T into E contiguous blocks), G experts of one
bucket (active experts with the same row count n), A active experts.

Why: the grouped-matmul path adds each row's expert bias as a separate gather + add and lets
autograd keep its own copies; on CPU those passes over [T, F] cost as much as the routing.
Here the active experts are put in buckets of equal row count (patch routing makes every count a
multiple of P*P, so a step has a handful of distinct counts) and each bucket is one batched GEMM
per matmul, the bias inside (``baddbmm``), written out forward and backward:

  forward   h = x W1 + b1     a = gelu(h)     y = a W2 + b2                    (per expert of the bucket)
  backward  da = dy W2^T      dW2 = a^T dy    db2 = sum_rows dy
            dh = gelu'(h) * da                dx = dh W1^T    dW1 = x^T dh    db1 = sum_rows dh

Why buckets: a GEMM of one expert's few rows runs on one core (the BLAS does not split it), so
with many experts a loop over experts left the second core idle while the dense FFN's large GEMMs
used both; a batched GEMM splits its batch over the cores, and a bucket's Python work is the same
for 2 experts or 200. A bucket whose experts are consecutive ids uses views of the rows and
weights; otherwise its rows and weights are gathered once (``index_select``) and its outputs and
weight gradients scattered (``index_copy_``). Each expert's GEMMs are the same BLAS calls as an
unbatched loop, so the values are bit-identical to it (tests/unit/moe/test_fast_paths.py).

Same multiply-adds as the dense FFN of hidden width F over T rows; an expert with no rows gets
zero gradients. Needs the block sizes on the host (one device sync on GPUs, free on CPU).
The weight gradients go into the layer's persistent buffers when it passes them
(moe/grad_buffers.py): no step allocates or zero-fills the [E, ...] gradients of idle experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from common import compat
from moe.grad_buffers import ExpertGradBuffers


# An expert whose GEMMs are shorter than this (2 * n * C * F flops each) goes in a batched bucket: its
# per-op Python and BLAS-call overhead would be a large part of it. Longer ones are buckets of one
# (views, no gathers): gathering an expert's weights costs C*F copies, a fixed share of a short GEMM
# but not worth it for a long one. Measured on the 2-core CPU (FFN alone, x the dense FFN's time):
# C=128 F=256 n=64 (E=512) 2.5 -> 1.4 batched; C=256 F=512 n~400 (E=64) 0.91 one by one, 0.93 batched.
BATCH_BELOW_FLOP = 10e6


@dataclass(frozen=True)
class Bucket:
    """Active experts with ``rows_each`` rows each: their ids and where their rows sit in T."""

    rows_each: int  # n
    ids: tuple[int, ...]  # [G] expert ids, ascending
    starts: tuple[int, ...]  # [G] first row of each expert in T

    @property
    def consecutive(self) -> bool:
        """Consecutive ids: the rows form one block of T and the weights one slice (views, no copies)."""
        return self.ids[-1] - self.ids[0] + 1 == len(self.ids)

    def take(self, t: torch.Tensor, ids_G: torch.Tensor | None) -> torch.Tensor:
        """This bucket's experts of a stacked [E, ...] tensor -> [G, ...]."""
        if ids_G is None:
            return t[self.ids[0]: self.ids[-1] + 1]
        return t.flatten(1).index_select(0, ids_G).view(len(self.ids), *t.shape[1:])  # 2-D: the fast kernel

    def rows_of(self, x_TC: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """This bucket's rows of [T, C] -> [G, n, C]."""
        g, n = len(self.ids), self.rows_each
        if rows is None:
            return x_TC[self.starts[0]: self.starts[0] + g * n].view(g, n, -1)
        return x_TC.index_select(0, rows).view(g, n, -1)


def buckets_of(counts: list[int], flop_per_row: float = 0.0) -> list[Bucket]:
    """The active experts of ``counts`` in buckets of equal row count (in order of first appearance);
    experts whose GEMMs reach BATCH_BELOW_FLOP (``flop_per_row`` = 2 * C * F per row) one per bucket."""
    by: dict[int, tuple[list[int], list[int]]] = {}
    start = 0
    for e, n in enumerate(counts):
        if n:
            ids, starts = by.setdefault(n, ([], []))
            ids.append(e)
            starts.append(start)
        start += n
    out = []
    for n, (ids, starts) in by.items():
        if n * flop_per_row >= BATCH_BELOW_FLOP:  # one expert per bucket: views, no gathers
            out += [Bucket(n, (e,), (s,)) for e, s in zip(ids, starts)]
        else:
            out.append(Bucket(n, tuple(ids), tuple(starts)))
    return out


def _indices(b: Bucket, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(ids [G], rows [G*n]) as index tensors, or (None, None) when the bucket is consecutive."""
    if b.consecutive:
        return None, None
    ids = torch.tensor(b.ids, device=device)
    rows = (torch.tensor(b.starts, device=device)[:, None] + torch.arange(b.rows_each, device=device)).reshape(-1)
    return ids, rows


def _bmm(a_GMK: torch.Tensor, b_GKN: torch.Tensor, bias_G1N: torch.Tensor | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """Batched (bias +) GEMM, into ``out`` when given; a bucket of one expert is a plain 2-D GEMM,
    which the BLAS splits over the cores when it is large (its batched GEMM splits only the batch)."""
    if a_GMK.shape[0] == 1:
        o = None if out is None else out[0]
        y = torch.mm(a_GMK[0], b_GKN[0], out=o) if bias_G1N is None else \
            torch.addmm(bias_G1N[0, 0], a_GMK[0], b_GKN[0], out=o)
        return y.unsqueeze(0) if out is None else out
    return torch.bmm(a_GMK, b_GKN, out=out) if bias_G1N is None else torch.baddbmm(bias_G1N, a_GMK, b_GKN, out=out)


def _into_rows(dst_TC: torch.Tensor, b: Bucket, rows: torch.Tensor | None, compute) -> None:
    """The bucket's [G, n, C] result into its rows of ``dst_TC``: written in place when they are one
    block, else computed and scattered. ``compute(out)`` returns the result (into ``out`` if given)."""
    g, n = len(b.ids), b.rows_each
    if rows is None:
        compute(dst_TC[b.starts[0]: b.starts[0] + g * n].view(g, n, -1))
    else:
        dst_TC.index_copy_(0, rows, compute(None).reshape(g * n, -1))


def _into_experts(dst_E: torch.Tensor, b: Bucket, ids: torch.Tensor | None, compute) -> None:
    """The bucket's [G, ...] result into its experts' slices of ``dst_E`` (in place when consecutive)."""
    if ids is None:
        compute(dst_E[b.ids[0]: b.ids[-1] + 1])
    else:
        dst_E.view(dst_E.shape[0], -1).index_copy_(0, ids, compute(None).flatten(1))  # 2-D: the fast kernel


class _ExpertFFN(torch.autograd.Function):
    """Bucket by bucket, forward and backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x_TC, w1_ECF, b1_EF, w2_EFC, b2_EC, counts, grads):  # noqa: D102
        y_TC = x_TC.new_empty(x_TC.shape[0], w2_EFC.shape[2])
        saved = []
        for b in buckets_of(counts, 2.0 * w1_ECF.shape[1] * w1_ECF.shape[2]):
            ids, rows = _indices(b, x_TC.device)
            x_GnC = b.rows_of(x_TC, rows)
            w1_GCF, w2_GFC = b.take(w1_ECF, ids), b.take(w2_EFC, ids)
            h_GnF = _bmm(x_GnC, w1_GCF, b.take(b1_EF, ids).unsqueeze(1))
            a_GnF = F.gelu(h_GnF)
            _into_rows(y_TC, b, rows, lambda out: _bmm(a_GnF, w2_GFC, b.take(b2_EC, ids).unsqueeze(1), out))
            saved.append((b, ids, rows, x_GnC, w1_GCF, w2_GFC, h_GnF, a_GnF))
        ctx.buckets = saved  # rows/weights of each bucket (gathered copies or views), kept for the backward
        ctx.x_shape = x_TC.shape
        ctx.counts = counts
        ctx.grads, ctx.params = grads, (w1_ECF, b1_EF, w2_EFC, b2_EC)
        return y_TC

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_TC):  # noqa: D102
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        dy_TC = dy_TC.contiguous()
        dx_TC = dy_TC.new_empty(ctx.x_shape) if need_x else None
        active = frozenset(e for e, n in enumerate(ctx.counts) if n)
        dw1, db1, dw2, db2 = (_weight_grad(ctx.grads, p, active) if need else None
                              for p, need in zip(ctx.params, (need_w1, need_b1, need_w2, need_b2)))
        for b, ids, rows, x_GnC, w1_GCF, w2_GFC, h_GnF, a_GnF in ctx.buckets:
            dy_GnC = b.rows_of(dy_TC, rows)
            if need_w2:
                _into_experts(dw2, b, ids, lambda out: _bmm(a_GnF.transpose(1, 2), dy_GnC, out=out))
            if need_b2:
                _into_experts(db2, b, ids, lambda out: torch.sum(dy_GnC, 1, out=out))
            dh_GnF = compat.gelu_backward_(_bmm(dy_GnC, w2_GFC.transpose(1, 2)), h_GnF)  # in place
            if need_x:
                _into_rows(dx_TC, b, rows, lambda out: _bmm(dh_GnF, w1_GCF.transpose(1, 2), out=out))
            if need_w1:
                _into_experts(dw1, b, ids, lambda out: _bmm(x_GnC.transpose(1, 2), dh_GnF, out=out))
            if need_b1:
                _into_experts(db1, b, ids, lambda out: torch.sum(dh_GnF, 1, out=out))
        ctx.buckets = None
        # a persistent buffer goes back as a fresh alias: autograd adopts it as .grad, no copy
        return (dx_TC, *(g.detach() if g is not None else None for g in (dw1, db1, dw2, db2)), None, None)


def _weight_grad(grads: ExpertGradBuffers | None, param: torch.Tensor, active: frozenset[int]) -> torch.Tensor:
    """Where the backward writes ``param``'s gradient (the active experts' slices; the rest are zero)."""
    if grads is None:
        return torch.zeros_like(param)
    return grads.grad_for(param, active)[0]


def expert_ffn(x_TC: torch.Tensor, w1_ECF: torch.Tensor, b1_EF: torch.Tensor, w2_EFC: torch.Tensor,
               b2_EC: torch.Tensor, counts: list[int], grads: ExpertGradBuffers | None = None) -> torch.Tensor:
    """Per-expert Linear-GELU-Linear over row blocks of ``counts``: [T, C] -> [T, C_out]. ``grads``:
    persistent buffers for the weight gradients (None: fresh tensors every backward)."""
    if x_TC.shape[0] != sum(counts):
        raise ValueError(f"expert_ffn: {x_TC.shape[0]} rows but the counts add up to {sum(counts)}")
    return _ExpertFFN.apply(x_TC.contiguous(), w1_ECF, b1_EF, w2_EFC, b2_EC, list(counts), grads)

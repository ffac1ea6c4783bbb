"""Local experts, computed batched: stacked per-expert weights and one grouped matmul per layer.

Legend
  U routed units (rows sorted by expert), L points per unit (P*P, 1 for tokens),
  C model channels, F hidden width, E local experts, T = U*L points.

Every expert family takes ``x_ULC`` plus ``counts_E`` (units per local expert, in order) and
returns ``[U, L, C_out]``. Per-expert LayerNorm affine parameters and biases are gathered per
row (``param[row_expert]``), so no Python loop runs over experts or units.

The module holds only this rank's experts (``num_local``); which global ids they are is the
dispatcher's business.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.config import ExpertConfig
from moe.fused_ffn import expert_ffn
from moe.grad_buffers import ExpertGradBuffers
from moe.grouped import ExpertBatch, grouped_linear
from moe.indexing import gather_rows


def _stacked(e: int, fan_in: int, *shape: int) -> nn.Parameter:
    """nn.Linear-style init (U(-1/sqrt(fan_in), +)) for E stacked copies."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(e, *shape).uniform_(-bound, bound))


class GroupedExperts(nn.Module):
    """Base: builds the per-point row layout once per call; subclasses compute on it."""

    def __init__(self, num_local: int, impl: str):
        super().__init__()
        self.num_local = num_local
        self.impl = impl

    def forward(self, x_ULC: torch.Tensor, counts_E: torch.Tensor, host_counts=None) -> torch.Tensor:
        """``host_counts``: ``counts_E`` as a host list when the dispatcher already read it."""
        u, l, c = x_ULC.shape
        batch = ExpertBatch.from_counts(counts_E, repeat=l, total=u * l, host_counts=host_counts)  # a row per point
        return self._compute(x_ULC, batch)

    def _compute(self, x_ULC: torch.Tensor, batch: ExpertBatch) -> torch.Tensor:
        raise NotImplementedError


class ResidualMLPExperts(GroupedExperts):
    """The thesis fusion's ExpertNetwork (Linear-LN-GELU-Dropout x2 + residual projection), E copies:
        expert(x) = Drop(GELU(LN(Linear(Drop(GELU(LN(Linear(x)))))))) + Linear_res(x)
    The first Linear and the residual Linear share one grouped matmul (weights concatenated).
    """

    def __init__(self, num_local: int, dim: int, hidden: int, out_dim: int | None = None,
                 dropout: float = 0.1, impl: str = "auto"):
        super().__init__(num_local, impl)
        out_dim = out_dim or dim
        e = num_local
        self.hidden, self.out_dim, self.dropout = hidden, out_dim, dropout
        # [E, C, F + C_out]: columns [:F] are expert.0 (Linear C->F), [F:] residual_proj.
        self.w_in = _stacked(e, dim, dim, hidden + out_dim)
        self.b_in = _stacked(e, dim, hidden + out_dim)
        self.ln1_w = nn.Parameter(torch.ones(e, hidden))
        self.ln1_b = nn.Parameter(torch.zeros(e, hidden))
        self.w_out = _stacked(e, hidden, hidden, out_dim)
        self.b_out = _stacked(e, hidden, out_dim)
        self.ln2_w = nn.Parameter(torch.ones(e, out_dim))
        self.ln2_b = nn.Parameter(torch.zeros(e, out_dim))

    def _compute(self, x_ULC: torch.Tensor, batch: ExpertBatch) -> torch.Tensor:
        u, l, c = x_ULC.shape
        x_TC = x_ULC.reshape(u * l, c)
        r = batch.row_expert
        both = grouped_linear(x_TC, self.w_in, self.b_in, batch, self.impl)
        h, residual = both[:, : self.hidden], both[:, self.hidden:]
        h = F.layer_norm(h, (self.hidden,)) * gather_rows(self.ln1_w, r) + gather_rows(self.ln1_b, r)
        h = F.dropout(F.gelu(h), self.dropout, self.training)
        h = grouped_linear(h, self.w_out, self.b_out, batch, self.impl)
        h = F.layer_norm(h, (self.out_dim,)) * gather_rows(self.ln2_w, r) + gather_rows(self.ln2_b, r)
        h = F.dropout(F.gelu(h), self.dropout, self.training)
        return (h + residual).reshape(u, l, self.out_dim)


class FFNExperts(GroupedExperts):
    """Plain FFN experts: Linear(C, F) - GELU - Linear(F, C)."""

    def __init__(self, num_local: int, dim: int, hidden: int, impl: str = "auto"):
        super().__init__(num_local, impl)
        self.w1 = _stacked(num_local, dim, dim, hidden)
        self.b1 = _stacked(num_local, dim, hidden)
        self.w2 = _stacked(num_local, hidden, hidden, dim)
        self.b2 = _stacked(num_local, hidden, dim)
        self.grad_buffers = ExpertGradBuffers()  # the fused path's weight gradients, kept between steps

    def forward(self, x_ULC: torch.Tensor, counts_E: torch.Tensor, host_counts=None) -> torch.Tensor:
        # "fused" (the default on CPU): batched GEMMs over buckets of experts, bias inside, backward by hand.
        # It walks the experts on the host, so it needs the counts there (a read unless given).
        if not (self.impl == "fused" or (self.impl == "auto" and not x_ULC.is_cuda)):
            return super().forward(x_ULC, counts_E, host_counts)
        u, l, c = x_ULC.shape
        counts = [n * l for n in (host_counts if host_counts is not None else counts_E.tolist())]
        y = expert_ffn(x_ULC.reshape(u * l, c), self.w1, self.b1, self.w2, self.b2, counts, self.grad_buffers)
        return y.reshape(u, l, c)

    def _compute(self, x_ULC: torch.Tensor, batch: ExpertBatch) -> torch.Tensor:
        u, l, c = x_ULC.shape
        h = F.gelu(grouped_linear(x_ULC.reshape(u * l, c), self.w1, self.b1, batch, self.impl))
        return grouped_linear(h, self.w2, self.b2, batch, self.impl).reshape(u, l, c)


def _im2col3x3(x_UPPC: torch.Tensor) -> torch.Tensor:
    """3x3 neighbourhoods inside each patch (zero beyond its border): [U, P, P, C] -> [U*P*P, C*9].

    Column order is (c, kh, kw), matching ``conv.weight.reshape(F, C*9)``.
    """
    u, p, _, c = x_UPPC.shape
    cols = F.unfold(x_UPPC.permute(0, 3, 1, 2), kernel_size=3, padding=1)  # [U, C*9, P*P]
    return cols.transpose(1, 2).reshape(u * p * p, c * 9)


class ConvExperts(GroupedExperts):
    """Spatial patch experts: Conv3x3(C->F) - GELU - Conv3x3(F->C) inside each P x P patch.

    Each conv is an im2col (shared by all experts) followed by one grouped matmul, so a
    patch's convolution uses its own expert's kernel with no loop over experts.
    """

    def __init__(self, num_local: int, dim: int, hidden: int, impl: str = "auto"):
        super().__init__(num_local, impl)
        self.hidden = hidden
        self.w1 = _stacked(num_local, dim * 9, dim * 9, hidden)
        self.b1 = _stacked(num_local, dim * 9, hidden)
        self.w2 = _stacked(num_local, hidden * 9, hidden * 9, dim)
        self.b2 = _stacked(num_local, hidden * 9, dim)

    def _compute(self, x_ULC: torch.Tensor, batch: ExpertBatch) -> torch.Tensor:
        u, l, c = x_ULC.shape
        p = math.isqrt(l)
        h = grouped_linear(_im2col3x3(x_ULC.reshape(u, p, p, c)), self.w1, self.b1, batch, self.impl)
        h = F.gelu(h).reshape(u, p, p, self.hidden)
        y = grouped_linear(_im2col3x3(h), self.w2, self.b2, batch, self.impl)
        return y.reshape(u, l, c)


def build_experts(cfg: ExpertConfig, num_local: int, dim: int) -> GroupedExperts:
    """The expert family named by ``cfg.kind``, holding ``num_local`` experts."""
    if cfg.kind == "seed":
        return ResidualMLPExperts(num_local, dim, cfg.hidden_dim, dropout=cfg.dropout, impl=cfg.impl)
    if cfg.kind == "ffn":
        return FFNExperts(num_local, dim, cfg.hidden_dim, impl=cfg.impl)
    return ConvExperts(num_local, dim, cfg.hidden_dim, impl=cfg.impl)

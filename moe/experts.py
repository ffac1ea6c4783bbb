"""Local experts, computed batched: stacked per-expert weights and one grouped matmul per layer.

Legend
  U routed units (rows sorted by expert), L points per unit (P*P, 1 for tokens),
  C model channels, F hidden width, E local experts, T = U*L points.

Every expert family takes ``x_ULC`` plus ``counts_E`` (units per local expert, in order) and
returns ``[U, L, C_out]``. Per-expert LayerNorm affine parameters and biases are gathered per
row (``param[row_expert]``), so no Python loop runs over experts or units.

The module holds only this rank's experts (``num_local``, global ids ``first`` ..); the dispatcher
decides which those are.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.config import ExpertConfig
from moe.fused_ffn import expert_ffn
from moe.grad_buffers import ExpertGradBuffers
from moe.grouped import ExpertBatch, grouped_linear
from moe.indexing import gather_rows


_EXPERT_DEVICE: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar("expert_device", default=None)


@contextlib.contextmanager
def experts_on_meta():
    """Layers built inside hold their experts on the meta device (shapes, no memory, no init):
    for a model whose MoE layers are about to be replaced by their expert-parallel shards
    (parallel/ds_moe.py ``shard_moe_layers``), so that no rank ever holds all E experts."""
    token = _EXPERT_DEVICE.set(torch.device("meta"))
    try:
        yield
    finally:
        _EXPERT_DEVICE.reset(token)


def draw_expert_seed() -> int:
    """A layer's expert seed, one draw from torch's global generator (so it follows ``manual_seed``
    and the layer's place in the model, never the expert count)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def expert_generator(seed: int, expert: int) -> torch.Generator:
    """The generator of global expert ``expert`` of a layer with ``seed``: its own stream."""
    state = np.random.SeedSequence([seed, expert]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class GroupedExperts(nn.Module):
    """Base: builds the per-point row layout once per call; subclasses compute on it.

    Holds experts ``first .. first + num_local - 1`` of a layer. Expert e's initial weights depend
    only on (``seed``, e): each is drawn from its own generator (:func:`expert_generator`), so
    whichever rank builds it, with however many others, it starts the same (sharded construction,
    issue 28). ``seed`` None draws one (:func:`draw_expert_seed`).
    """

    def __init__(self, num_local: int, impl: str, first: int = 0, seed: int | None = None,
                 device: torch.device | None = None):
        super().__init__()
        self.num_local = num_local
        self.impl = impl
        self.first = first
        self.seed = draw_expert_seed() if seed is None else seed
        self.built_on = device or torch.device("cpu")  # meta: shapes only (experts_on_meta)
        self._inits: dict[str, tuple[str, float]] = {}  # parameter -> (kind, uniform bound)

    def _stacked(self, name: str, fan_in: int, *shape: int) -> None:
        """nn.Linear-style init (U(-1/sqrt(fan_in), +)), one [shape] per local expert."""
        self._add(name, shape, ("uniform", 1.0 / math.sqrt(fan_in)))

    def _constant(self, name: str, value: float, *shape: int) -> None:
        self._add(name, shape, ("ones" if value == 1.0 else "zeros", 0.0))

    def _add(self, name: str, shape: tuple[int, ...], init: tuple[str, float]) -> None:
        self.register_parameter(name, nn.Parameter(torch.empty(self.num_local, *shape, device=self.built_on)))
        self._inits[name] = init

    def reset_experts(self) -> None:
        """(Re)initialise every local expert from its own generator; a meta build stays empty."""
        if self.built_on.type == "meta":
            return
        with torch.no_grad():
            for i in range(self.num_local):
                gen = expert_generator(self.seed, self.first + i)
                for name, (kind, bound) in self._inits.items():
                    row = getattr(self, name)[i]
                    if kind == "uniform":
                        row.copy_(torch.empty(row.shape).uniform_(-bound, bound, generator=gen))
                    else:
                        row.fill_(1.0 if kind == "ones" else 0.0)

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
                 dropout: float = 0.1, impl: str = "auto", first: int = 0, seed: int | None = None,
                 device: torch.device | None = None):
        super().__init__(num_local, impl, first, seed, device)
        out_dim = out_dim or dim
        self.hidden, self.out_dim, self.dropout = hidden, out_dim, dropout
        # [E, C, F + C_out]: columns [:F] are expert.0 (Linear C->F), [F:] residual_proj.
        self._stacked("w_in", dim, dim, hidden + out_dim)
        self._stacked("b_in", dim, hidden + out_dim)
        self._constant("ln1_w", 1.0, hidden)
        self._constant("ln1_b", 0.0, hidden)
        self._stacked("w_out", hidden, hidden, out_dim)
        self._stacked("b_out", hidden, out_dim)
        self._constant("ln2_w", 1.0, out_dim)
        self._constant("ln2_b", 0.0, out_dim)
        self.reset_experts()

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

    def __init__(self, num_local: int, dim: int, hidden: int, impl: str = "auto", first: int = 0,
                 seed: int | None = None, device: torch.device | None = None):
        super().__init__(num_local, impl, first, seed, device)
        self._stacked("w1", dim, dim, hidden)
        self._stacked("b1", dim, hidden)
        self._stacked("w2", hidden, hidden, dim)
        self._stacked("b2", hidden, dim)
        self.reset_experts()
        self.grad_buffers = ExpertGradBuffers()  # the fused path's weight gradients, kept between steps

    def forward(self, x_ULC: torch.Tensor, counts_E: torch.Tensor, host_counts=None) -> torch.Tensor:
        # "fused" (the default on CPU): batched GEMMs over buckets of experts, bias inside, backward by hand.
        # It walks the experts on the host, so it needs the counts there (a read unless given).
        if not (self.impl == "fused" or (self.impl == "auto" and not x_ULC.is_cuda)) or torch.compiler.is_compiling():
            return super().forward(x_ULC, counts_E, host_counts)  # (a compiled layer traces the grouped path)
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

    def __init__(self, num_local: int, dim: int, hidden: int, impl: str = "auto", first: int = 0,
                 seed: int | None = None, device: torch.device | None = None):
        super().__init__(num_local, impl, first, seed, device)
        self.hidden = hidden
        self._stacked("w1", dim * 9, dim * 9, hidden)
        self._stacked("b1", dim * 9, hidden)
        self._stacked("w2", hidden * 9, hidden * 9, dim)
        self._stacked("b2", hidden * 9, dim)
        self.reset_experts()

    def _compute(self, x_ULC: torch.Tensor, batch: ExpertBatch) -> torch.Tensor:
        u, l, c = x_ULC.shape
        p = math.isqrt(l)
        h = grouped_linear(_im2col3x3(x_ULC.reshape(u, p, p, c)), self.w1, self.b1, batch, self.impl)
        h = F.gelu(h).reshape(u, p, p, self.hidden)
        y = grouped_linear(_im2col3x3(h), self.w2, self.b2, batch, self.impl)
        return y.reshape(u, l, c)


def build_experts(cfg: ExpertConfig, num_local: int, dim: int, first: int = 0,
                  seed: int | None = None) -> GroupedExperts:
    """The expert family named by ``cfg.kind``, holding experts ``first .. first + num_local - 1``
    of a layer whose expert seed is ``seed`` (drawn when None); on the meta device inside
    :func:`experts_on_meta` (the layers that shard_moe_layers replaces build theirs here)."""
    where = dict(first=first, seed=seed, device=_EXPERT_DEVICE.get())
    if cfg.kind == "seed":
        return ResidualMLPExperts(num_local, dim, cfg.hidden_dim, dropout=cfg.dropout, impl=cfg.impl, **where)
    if cfg.kind == "ffn":
        return FFNExperts(num_local, dim, cfg.hidden_dim, impl=cfg.impl, **where)
    return ConvExperts(num_local, dim, cfg.hidden_dim, impl=cfg.impl, **where)

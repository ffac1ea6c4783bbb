"""One matmul over all local experts: rows sorted by expert times per-expert weights.

Legend: T rows (sorted by expert), D in-features, F out-features, E local experts.

Two backends, same result:
  grouped_mm  ``torch._grouped_mm`` with cumulative row offsets (no padding, no host sync).
              Needs fp32/bf16/fp16 and row strides that are multiples of 16 bytes (D and F
              multiples of 4 in fp32, of 8 in bf16); on CUDA it needs bf16 and sm90+. Whether
              this torch has it on this device is common/compat.py's business.
  bmm         rows scattered into an [E, M, D] buffer (M = the largest expert's row count,
              one host read when the counts are not on the host already), one ``torch.bmm``,
              gathered back. Works for every dtype, device and shape.
``impl="auto"`` takes grouped_mm where it applies and bmm elsewhere ("fused" too: it changes only
the FFN experts, see moe/fused_ffn.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common import compat
from moe.indexing import gather_rows

Impl = str  # "auto" | "grouped_mm" | "bmm"


@dataclass(frozen=True)
class ExpertBatch:
    """Where each expert's rows sit in a row-sorted batch; built once, read by every matmul.

    Built without reading the device: the row count comes from the caller (the rows' shape),
    and the largest count (bmm's padding) is read only if the bmm backend asks for it.
    """

    counts: torch.Tensor  # [E] int64 rows per expert
    offsets: torch.Tensor  # [E] int32 cumulative row ends (grouped_mm's ``offs``)
    row_expert: torch.Tensor  # [T] int64 expert of each row
    row_pos: torch.Tensor  # [T] int64 position of each row inside its expert's block
    host_counts: tuple | None = None  # [E] the counts on the host, when the caller has them
    _read: dict = field(default_factory=dict, compare=False, repr=False)  # max_count once read from the device

    @staticmethod
    def from_counts(counts_E: torch.Tensor, repeat: int = 1, total: int | None = None,
                    host_counts=None) -> "ExpertBatch":
        """Rows sorted by expert, ``counts_E[e] * repeat`` rows for expert e; ``total`` = T when known
        (else read from the device: one sync), ``host_counts`` = ``counts_E`` as a host list if known."""
        counts = counts_E.long() * repeat
        e = counts.shape[0]
        device = counts.device
        host = tuple(n * repeat for n in host_counts) if host_counts is not None else None
        if total is None:
            total = sum(host) if host is not None else int(counts.sum())
        starts = torch.cumsum(counts, 0) - counts
        row_expert = torch.repeat_interleave(torch.arange(e, device=device), counts, output_size=total)
        row_pos = torch.arange(total, device=device) - starts[row_expert]
        return ExpertBatch(counts, torch.cumsum(counts, 0).int(), row_expert, row_pos, host)

    @property
    def max_count(self) -> int:
        """M, the largest count (bmm padding): a host read (once) unless the counts are on the host.
        (Not a functools.cached_property: its lock stops torch.compile.)"""
        if self.counts.shape[0] == 0:
            return 0
        if self.host_counts is not None:
            return max(self.host_counts)
        if "max" not in self._read:
            self._read["max"] = int(self.counts.max())
        return self._read["max"]

    @property
    def num_rows(self) -> int:
        return self.row_expert.shape[0]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (grouped_mm refuses 0-strides)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return g.contiguous()


def grouped_matmul(x_TD: torch.Tensor, w_EDF: torch.Tensor, batch: ExpertBatch, impl: Impl = "auto") -> torch.Tensor:
    """y[t] = x[t] @ w[expert(t)]: [T, D] x [E, D, F] -> [T, F]."""
    use_gmm = impl == "grouped_mm" or (impl in ("auto", "fused") and compat.grouped_mm_supported(x_TD, w_EDF))
    if impl == "grouped_mm" and not compat.grouped_mm_supported(x_TD, w_EDF):
        where = f"{x_TD.device} inside torch.compile (bf16 only there)" if torch.compiler.is_compiling() else x_TD.device
        raise ValueError(
            f"expert.impl='grouped_mm' cannot run dtype={x_TD.dtype}, D={x_TD.shape[1]}, "
            f"F={w_EDF.shape[2]} on {where}; use impl='auto' or 'bmm'"
        )
    if use_gmm:
        y = compat.grouped_mm(x_TD.contiguous(), w_EDF, batch.offsets)
        return _ContiguousGrad.apply(y)
    e, d, f = w_EDF.shape
    buf_EMD = x_TD.new_zeros(e, batch.max_count, d)
    buf_EMD = buf_EMD.index_put((batch.row_expert, batch.row_pos), x_TD)
    y_EMF = torch.bmm(buf_EMD, w_EDF)
    return gather_rows(y_EMF.reshape(e * batch.max_count, f), batch.row_expert * batch.max_count + batch.row_pos)


def grouped_linear(
    x_TD: torch.Tensor, w_EDF: torch.Tensor, b_EF: torch.Tensor | None, batch: ExpertBatch, impl: Impl = "auto"
) -> torch.Tensor:
    """Per-expert affine map: x[t] @ w[e] + b[e] with e = expert(t)."""
    y = grouped_matmul(x_TD, w_EDF, batch, impl)
    if b_EF is not None:
        y = y + gather_rows(b_EF, batch.row_expert)
    return y

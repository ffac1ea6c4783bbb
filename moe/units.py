"""Routing units: cut a feature map into patches (or tokens) and put it back.

Legend
  B batch, H/W map height/width, C channels, P patch side,
  nh/nw patches per column/row, N = B*nh*nw routing units, L = P*P points per unit.

Patch routing (the thesis's Patch-MoE): the P x P points of a patch share one routing decision; the gate
sees the patch mean-pooled over its real points. Token routing is the case P = 1.

Maps whose H or W is not a multiple of P are zero-padded at the bottom/right up to one; the
pooling that feeds the gate ignores the padded points (so a border patch is routed on its
real content only) and the output is cropped back to H x W. ``pad_mode="error"`` refuses
such maps instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe.indexing import gather_rows


@dataclass(frozen=True)
class PatchGrid:
    """Geometry of one unfold, read back by :func:`unpatchify`."""

    batch: int
    height: int
    width: int
    patch: int
    n_h: int
    n_w: int

    @property
    def padded(self) -> bool:
        return self.n_h * self.patch != self.height or self.n_w * self.patch != self.width

    @property
    def num_units(self) -> int:
        return self.batch * self.n_h * self.n_w


def make_grid(x_BHWC: torch.Tensor, patch: int, pad_mode: str = "pad") -> PatchGrid:
    if x_BHWC.dim() != 4:
        raise ValueError(f"expected a feature map [B, H, W, C], got shape {tuple(x_BHWC.shape)}")
    b, h, w, _ = x_BHWC.shape
    if pad_mode == "error" and (h % patch or w % patch):
        raise ValueError(
            f"feature map {h}x{w} is not divisible by patch_size={patch}; "
            f"resize to a multiple of {patch} or set pad_mode='pad'"
        )
    return PatchGrid(b, h, w, patch, -(-h // patch), -(-w // patch))


def patchify(x_BHWC: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """[B, H, W, C] -> units [N, L, C] (row-major patches, row-major points inside)."""
    p = grid.patch
    pad_h, pad_w = grid.n_h * p - grid.height, grid.n_w * p - grid.width
    if pad_h or pad_w:
        x_BHWC = F.pad(x_BHWC, (0, 0, 0, pad_w, 0, pad_h))
    c = x_BHWC.shape[-1]
    x = x_BHWC.reshape(grid.batch, grid.n_h, p, grid.n_w, p, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(grid.num_units, p * p, c)


def unpatchify(u_NLC: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """Units [N, L, C] -> [B, H, W, C], cropping any padding."""
    p, c = grid.patch, u_NLC.shape[-1]
    x = u_NLC.reshape(grid.batch, grid.n_h, grid.n_w, p, p, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(grid.batch, grid.n_h * p, grid.n_w * p, c)
    if grid.padded:
        x = x[:, : grid.height, : grid.width]
    return x


def valid_points(grid: PatchGrid, device: torch.device) -> torch.Tensor:
    """[N, L] float mask: 1 for real points, 0 for padding."""
    ones = torch.ones(grid.batch, grid.height, grid.width, 1, device=device)
    return patchify(ones, grid).squeeze(-1)


def pool_units(u_NLC: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """Mean over each unit's real points: [N, L, C] -> [N, C] (what the gate sees)."""
    if not grid.padded:
        return u_NLC.mean(dim=1)
    mask_NL = valid_points(grid, u_NLC.device).to(u_NLC.dtype)
    return (u_NLC * mask_NL.unsqueeze(-1)).sum(1) / mask_NL.sum(1, keepdim=True)


@dataclass(frozen=True)
class PatchView:
    """An unpadded [B, H, W, C] map read as units [N, L, C] without copying the patches out.

    A *strip* is one row of one patch: P points x C channels, contiguous in the map. Unit n =
    (b, i, j) is the P strips (b, i*P + r, j) for r = 0..P-1, so the map viewed as strips
    [B*H*nw, P*C] serves any gather of whole units: :meth:`take` returns the same rows as
    ``patchify(x)[idx]`` (points row-major inside the patch), and its backward scatters
    straight into the map's gradient.
    """

    x_BHWC: torch.Tensor
    grid: PatchGrid

    @staticmethod
    def of(x_BHWC: torch.Tensor, grid: PatchGrid) -> "PatchView":
        if grid.padded:
            raise ValueError("PatchView needs H and W divisible by the patch size; use patchify")
        return PatchView(x_BHWC.contiguous(), grid)

    @property
    def shape(self) -> tuple[int, int, int]:
        p = self.grid.patch
        return (self.grid.num_units, p * p, self.x_BHWC.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.x_BHWC.device

    def strips(self) -> torch.Tensor:
        """The map as strips [B*H*nw, P*C] (a view)."""
        return self.x_BHWC.reshape(-1, self.grid.patch * self.x_BHWC.shape[-1])

    def take(self, unit_idx_R: torch.Tensor) -> torch.Tensor:
        """Rows of the units ``unit_idx_R``: [R] -> [R, L, C]."""
        _, l, c = self.shape
        rows = gather_rows(self.strips(), strips_of_units(unit_idx_R, self.grid).reshape(-1))
        return rows.view(-1, l, c)

    def pooled(self) -> torch.Tensor:
        """Mean over each unit's points: [N, C] (what the gate sees).

        Summed in two passes that read the map in memory order (the P strip rows of a patch
        row, then the P points of a strip): a strided mean over (2, 4) is slower on CPU.
        """
        g, c = self.grid, self.x_BHWC.shape[-1]
        p = g.patch
        rows = self.x_BHWC.view(g.batch * g.n_h, p, g.n_w * p * c).sum(1)  # [B*nh, nw*P*C]
        return rows.view(g.num_units, p, c).sum(1) / (p * p)


def strips_of_units(unit_idx_R: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """Strip indices [R, P] of units [R] (unit n = (b*nh + i)*nw + j, strip (b*H + i*P + r)*nw + j)."""
    p, nw = grid.patch, grid.n_w
    r_P = torch.arange(p, device=unit_idx_R.device)
    return ((unit_idx_R // nw * p)[:, None] + r_P[None, :]) * nw + (unit_idx_R % nw)[:, None]


def take_units(units, unit_idx_R: torch.Tensor) -> torch.Tensor:
    """``units[idx]`` for a units tensor [N, L, C] or a :class:`PatchView`: -> [R, L, C]."""
    if isinstance(units, PatchView):
        return units.take(unit_idx_R)
    return gather_rows(units, unit_idx_R)

"""Expert weight gradients written in place into buffers that live as long as the layer.

Legend: E local experts; a stacked expert parameter is [E, ...] (one slice per expert).

Why: a step routes its patches to some of the E experts, yet the gradient of a stacked parameter
is a full [E, ...] tensor. Allocated fresh every step it costs a large allocation (on CPU a new
mmap whose pages fault in, zeroed by the kernel) plus a zero-fill of every idle expert: at E=512
that was most of the layer's backward. Here each parameter has one buffer, kept between steps:

  * the backward writes the active experts' slices into it (every element of those slices);
  * it zeroes only the experts that were written in an earlier step and are idle now (the rest
    are still zero), so a step's work is proportional to the experts it used;
  * autograd receives a fresh alias of the buffer (``detach()``: same storage, a new tensor), and
    when ``param.grad`` is unset it adopts that alias as ``param.grad`` without a copy.

The buffer is reused only while nothing else refers to its memory (the storage's reference
count): while ``param.grad`` holds it (gradients accumulating over micro-batches, or a
``zero_grad(set_to_none=False)``), while a caller keeps an earlier gradient (``torch.autograd.grad``
results, a saved ``param.grad``), the backward writes into a new buffer instead, which becomes the
one kept. Nothing handed out is ever overwritten. Values are bit-identical to the fresh-tensor
path: the same per-expert writes, and zeros where no row went.
"""

from __future__ import annotations

import torch


def _storage_refs(t: torch.Tensor) -> int | None:
    fn = getattr(torch._C, "_storage_Use_Count", None)
    return None if fn is None else fn(t.untyped_storage()._cdata)


def _calibrate() -> int | None:
    """The reference count a storage shows when one tensor holds it (None: cannot tell here)."""
    t = torch.zeros(1)
    alone = _storage_refs(t)
    if alone is None:
        return None
    alias = t.detach()
    shared = _storage_refs(t)
    del alias
    return alone if shared == alone + 1 and _storage_refs(t) == alone else None


_SOLE_OWNER_REFS = _calibrate()


def sole_owner(t: torch.Tensor) -> bool:
    """Whether ``t`` is the only tensor on its memory (False when that cannot be told)."""
    return _SOLE_OWNER_REFS is not None and _storage_refs(t) == _SOLE_OWNER_REFS


class ExpertGradBuffers:
    """One persistent gradient buffer per stacked expert parameter, and which experts it holds."""

    def __init__(self) -> None:
        self._bufs: dict[int, torch.Tensor] = {}
        self._written: dict[int, frozenset[int]] = {}

    def grad_for(self, param: torch.Tensor, active: frozenset[int]) -> tuple[torch.Tensor, bool]:
        """A [E, ...] tensor to write the ``active`` experts' gradients into: every other expert's
        slice is zero. -> (tensor, persistent): persistent when it is this parameter's buffer."""
        key = id(param)
        buf = self._bufs.get(key)
        if param.grad is not None:  # accumulating: autograd adds what we return to it
            return torch.zeros_like(param), False
        if buf is None or not sole_owner(buf) or buf.shape != param.shape or buf.dtype != param.dtype \
                or buf.device != param.device:  # first use, or its memory is still someone's gradient
            buf = self._bufs[key] = torch.zeros_like(param)
        else:
            stale = sorted(self._written.get(key, frozenset()) - active)
            if stale:
                buf.index_fill_(0, torch.tensor(stale, device=buf.device), 0)
        self._written[key] = active
        return buf, True

    def __len__(self) -> int:
        return len(self._bufs)

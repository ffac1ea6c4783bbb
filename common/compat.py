"""Torch and Python calls whose availability differs between the versions msmoe supports.

msmoe runs on Python 3.11 and 3.12 and on torch 2.11 (the CUDA 13 build of the GPU image)
through the pinned 2.13 (the CPU build of ``make setup``). Every call below exists in some of
those versions or devices and not in others; the rest of the code calls it only through here, so
a new torch changes this file and nothing else.

  grouped_mm_supported(x, w)  can ``torch._grouped_mm`` run these operands here? (probed once per
                              device and dtype: the op may be missing, CPU-less or dtype-limited)
  grouped_mm(x_TD, w_EDF, offs_E)  ``torch._grouped_mm`` itself; the one call site, so a check can
                              count calls by wrapping ``common.compat.grouped_mm``
  device_capability(device)   (major, minor) of a CUDA device, (0, 0) elsewhere
  sync_debug(mode)            context: ``torch.cuda.set_sync_debug_mode`` ("warn"/"error") and back;
                              does nothing without CUDA
  foreach_norm(tensors)       ``torch._foreach_norm`` (one fused launch), or a loop of norms
  gelu_backward_(grad, h)     GELU's backward written into ``grad`` (aten's out variant), or computed

Check on a machine:  python3 -c "import common.compat as c, torch; print(c.report(torch.device('cuda')))"
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def device_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device; (0, 0) for CPU and other devices."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return (0, 0)
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


_PROBED: dict[tuple, bool] = {}  # (device type, index, dtype) -> whether grouped_mm ran there


def _grouped_mm_runs(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    """Whether one tiny forward+backward of ``torch._grouped_mm`` runs on this device and dtype,
    probed once. Inside a torch.compile trace a probe cannot run (it makes tensors that require
    grad): there the answer of an earlier eager probe is used, and without one the op is taken as
    unavailable (the batched-matmul path, traced instead)."""
    key = (device_type, device_index, dtype)
    if key not in _PROBED:
        if torch.compiler.is_compiling():
            return False
        _PROBED[key] = _probe_grouped_mm(device_type, device_index, dtype)
    return _PROBED[key]


def _probe_grouped_mm(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    """torch 2.11 has the op on CUDA (bf16, sm90+); CPU support and other dtypes came later, and
    what a version lacks it reports as RuntimeError/NotImplementedError at the first call."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    device = torch.device(device_type, device_index)
    try:  # no random numbers (the caller's RNG stream stays as it was), grad on even under no_grad
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.ones(16, 16, device=device, dtype=dtype, requires_grad=True)
            w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
            offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
            y = fn(x, w, offs=offs)
            y.backward(torch.ones_like(y))
            return bool((y == 16).all()) and w.grad is not None
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs (forward and backward) on this device and dtype."""
    if dtype not in GROUPED_MM_DTYPES or device.type not in ("cpu", "cuda"):
        return False
    if device.type == "cuda":
        # sm90+ with bf16 is the combination torch documents for its CUDA kernel
        if dtype != torch.bfloat16 or device_capability(device)[0] < 9:
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _grouped_mm_runs("cuda", index, dtype)
    return _grouped_mm_runs("cpu", None, dtype)


def grouped_mm_supported(x_TD: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    """Whether ``grouped_mm(x_TD, w_EDF, offs)`` can run: same dtype, available here, and row
    strides that are multiples of 16 bytes (D and F multiples of 4 in fp32, of 8 in bf16)."""
    if x_TD.dtype != w_EDF.dtype or not grouped_mm_available(x_TD.device, x_TD.dtype):
        return False
    if torch.compiler.is_compiling() and x_TD.dtype != torch.bfloat16:
        return False  # torch's meta kernel for the op (what a trace runs) accepts bf16 only, whatever eager runs
    align = 16 // x_TD.element_size()
    return x_TD.shape[1] % align == 0 and w_EDF.shape[2] % align == 0


def grouped_mm(x_TD: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """[T, D] rows sorted by expert x [E, D, F] -> [T, F]; ``offs_E`` int32 cumulative row ends."""
    return torch._grouped_mm(x_TD, w_EDF, offs=offs_E)


@contextlib.contextmanager
def sync_debug(mode: str) -> Iterator[bool]:
    """Within the block, CUDA reports every host-device synchronisation: "warn" (a Python
    UserWarning per sync) or "error". Yields whether the mode is active (False without CUDA or
    without ``torch.cuda.set_sync_debug_mode``); the previous mode is restored on exit."""
    if mode not in ("default", "warn", "error"):
        raise ValueError(f"sync_debug mode={mode!r} is not one of ['default', 'warn', 'error']")
    setter = getattr(torch.cuda, "set_sync_debug_mode", None)
    getter = getattr(torch.cuda, "get_sync_debug_mode", None)
    if setter is None or not torch.cuda.is_available():
        yield False
        return
    previous = getter() if getter is not None else 0
    setter(mode)
    try:
        yield True
    finally:
        setter(previous)


def is_sync_warning(message: str) -> bool:
    """A warning raised by ``sync_debug("warn")`` (torch words it "called a synchronizing CUDA operation")."""
    return "synchroniz" in message.lower() and "cuda" in message.lower()


def foreach_norm(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """2-norm of each tensor: ``torch._foreach_norm`` (one fused launch) where it exists."""
    fn = getattr(torch, "_foreach_norm", None)
    if fn is not None:
        return list(fn(list(tensors)))
    return [torch.linalg.vector_norm(t) for t in tensors]


def foreach_mul_(tensors: Sequence[torch.Tensor], scale: torch.Tensor) -> None:
    """t *= scale for each tensor, ``scale`` a 0-d tensor (read on the device, never on the host)."""
    fn = getattr(torch, "_foreach_mul_", None)
    if fn is not None and tensors:
        fn(list(tensors), scale)
        return
    for t in tensors:
        t.mul_(scale)


def gelu_backward_(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """d GELU(h) / dh * grad (exact erf GELU), written into ``grad`` where aten's out variant exists."""
    op = getattr(torch.ops.aten.gelu_backward, "grad_input", None)
    if op is not None:
        return op(grad, h, grad_input=grad)
    return grad.copy_(torch.ops.aten.gelu_backward(grad, h))


def report(device: torch.device) -> dict:
    """What this module found on ``device`` (for logs and the GPU check's results)."""
    return {
        "torch": torch.__version__,
        "capability": list(device_capability(device)),
        "grouped_mm": {str(d).replace("torch.", ""): grouped_mm_available(device, d) for d in GROUPED_MM_DTYPES},
        "sync_debug_mode": hasattr(torch.cuda, "set_sync_debug_mode"),
        "foreach_norm": hasattr(torch, "_foreach_norm"),
    }

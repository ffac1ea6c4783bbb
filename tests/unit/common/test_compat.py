"""common/compat.py: the version-dependent torch calls and their fallbacks (CPU here; the GPU check
runs the CUDA side on the target's own torch)."""

import warnings

import pytest
import torch

from common import compat
from moe.grouped import ExpertBatch, grouped_matmul

CPU = torch.device("cpu")


def test_grouped_mm_support_follows_dtype_and_alignment():
    ok = compat.grouped_mm_available(CPU, torch.float32)
    x, w = torch.randn(6, 8), torch.randn(2, 8, 12)
    assert compat.grouped_mm_supported(x, w) == ok
    assert not compat.grouped_mm_supported(torch.randn(6, 5), torch.randn(2, 5, 12))  # 20-byte rows
    assert not compat.grouped_mm_supported(x.double(), w.double())  # not a grouped_mm dtype
    assert not compat.grouped_mm_supported(x, w.bfloat16())  # mixed dtypes
    assert not compat.grouped_mm_available(torch.device("meta"), torch.float32)


@pytest.mark.skipif(not compat.grouped_mm_available(CPU, torch.float32), reason="no CPU grouped_mm in this torch")
def test_grouped_mm_matches_per_expert_matmuls():
    x, w = torch.randn(7, 8), torch.randn(3, 8, 4)
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)  # expert 1 gets no rows
    y = compat.grouped_mm(x, w, offs)
    torch.testing.assert_close(y, torch.cat([x[:2] @ w[0], x[2:] @ w[2]]))


def test_probe_leaves_rng_alone_and_works_under_no_grad():
    compat._PROBED.clear()
    state = torch.get_rng_state()
    with torch.no_grad():
        inside = compat.grouped_mm_available(CPU, torch.float32)
    assert torch.equal(state, torch.get_rng_state())
    compat._PROBED.clear()
    assert compat.grouped_mm_available(CPU, torch.float32) == inside


def test_grouped_mm_calls_go_through_compat(monkeypatch):
    """The GPU check counts grouped_mm calls by wrapping compat.grouped_mm: every call lands there."""
    if not compat.grouped_mm_available(CPU, torch.float32):
        pytest.skip("no CPU grouped_mm in this torch")
    calls = []
    real = compat.grouped_mm
    monkeypatch.setattr(compat, "grouped_mm", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(5, 8), torch.randn(2, 8, 8)
    grouped_matmul(x, w, ExpertBatch.from_counts(torch.tensor([2, 3])), "auto")
    grouped_matmul(x, w, ExpertBatch.from_counts(torch.tensor([2, 3])), "bmm")
    assert len(calls) == 1


def test_sync_debug_without_cuda_is_inert():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU check covers the active path")
    with compat.sync_debug("warn") as active:
        assert active is False
        torch.ones(3).sum().item()
    with pytest.raises(ValueError, match="not one of"):
        with compat.sync_debug("loud"):
            pass


def test_sync_warning_text():
    # torch's wording (c10/cuda/CUDAFunctions.cpp, warn_or_error_on_sync)
    assert compat.is_sync_warning("called a synchronizing CUDA operation")
    assert not compat.is_sync_warning("some other UserWarning about CUDA")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.warn("called a synchronizing CUDA operation", UserWarning)
    assert sum(compat.is_sync_warning(str(w.message)) for w in seen) == 1


def test_foreach_norm_and_its_fallback(monkeypatch):
    ts = [torch.randn(3, 4), torch.randn(5), torch.zeros(2)]
    want = [torch.linalg.vector_norm(t) for t in ts]
    for got, ref in zip(compat.foreach_norm(ts), want):
        torch.testing.assert_close(got, ref)
    monkeypatch.delattr(torch, "_foreach_norm", raising=False)
    for got, ref in zip(compat.foreach_norm(ts), want):
        torch.testing.assert_close(got, ref)


def test_gelu_backward_in_place_matches_autograd():
    h = torch.randn(5, 7, requires_grad=True)
    g = torch.randn(5, 7)
    torch.nn.functional.gelu(h).backward(g)
    buf = g.clone()
    out = compat.gelu_backward_(buf, h.detach())
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(out, h.grad)


def test_report_on_cpu():
    r = compat.report(CPU)
    assert r["capability"] == [0, 0] and set(r["grouped_mm"]) == {"float32", "bfloat16", "float16"}

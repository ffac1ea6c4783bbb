import pytest
import torch

from moe.grouped import ExpertBatch, grouped_linear, grouped_matmul
from tests.helpers import needs_cpu_grouped_mm


def _loop_reference(x, w, b, counts):
    outs, start = [], 0
    for e, c in enumerate(counts.tolist()):
        outs.append(x[start:start + c] @ w[e] + (b[e] if b is not None else 0))
        start += c
    return torch.cat(outs)


@pytest.mark.parametrize("impl", ["bmm", pytest.param("grouped_mm", marks=needs_cpu_grouped_mm), "auto"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 0, 7], [2, 2, 2, 2], [0, 0, 0, 0]])
def test_matches_loop_forward_and_backward(impl, counts):
    counts = torch.tensor(counts)
    t = int(counts.sum())
    x = torch.randn(t, 8, requires_grad=True)
    w = torch.randn(4, 8, 12, requires_grad=True)
    b = torch.randn(4, 12, requires_grad=True)
    batch = ExpertBatch.from_counts(counts)
    y = grouped_linear(x, w, b, batch, impl)
    x2, w2, b2 = (t_.detach().clone().requires_grad_() for t_ in (x, w, b))
    ref = _loop_reference(x2, w2, b2, counts)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    if t:
        y.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-5)
        assert w.grad[counts == 0].abs().sum() == 0


@needs_cpu_grouped_mm
def test_sum_backward_through_grouped_mm():
    # torch._grouped_mm refuses an expanded (zero-stride) gradient; ours makes it contiguous.
    counts = torch.tensor([2, 3])
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(2, 8, 8, requires_grad=True)
    grouped_matmul(x, w, ExpertBatch.from_counts(counts), "grouped_mm").sum().backward()
    assert torch.allclose(x.grad[0], w[0].detach().sum(1))


def test_unaligned_shapes_fall_back_or_refuse():
    counts = torch.tensor([2, 3])
    x, w = torch.randn(5, 5), torch.randn(2, 5, 7)
    batch = ExpertBatch.from_counts(counts)
    torch.testing.assert_close(grouped_matmul(x, w, batch, "auto"), _loop_reference(x, w, None, counts))
    with pytest.raises(ValueError, match="impl='grouped_mm' cannot run"):
        grouped_matmul(x, w, batch, "grouped_mm")


def test_bf16_auto_matches_fp32_loosely():
    counts = torch.tensor([4, 4])
    x, w = torch.randn(8, 16), torch.randn(2, 16, 16)
    y = grouped_matmul(x.bfloat16(), w.bfloat16(), ExpertBatch.from_counts(counts), "auto")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), _loop_reference(x, w, None, counts), rtol=3e-2, atol=0.3)


def test_expert_batch_layout():
    batch = ExpertBatch.from_counts(torch.tensor([2, 0, 3]), repeat=2)
    assert batch.row_expert.tolist() == [0] * 4 + [2] * 6
    assert batch.row_pos.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert batch.offsets.tolist() == [4, 4, 10] and batch.max_count == 6

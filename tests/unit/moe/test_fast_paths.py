"""The CPU fast paths against the plain formulations they replace (values and every gradient).

fused FFN experts  vs  one nn-style Linear-GELU-Linear per expert block
slot_sum(_to_map)  vs  index_add of weighted rows (+ unpatchify)
PatchView          vs  patchify + row gather / masked mean
(the host allocator: tests/integration/test_allocator.py)
"""

import pytest
import torch
import torch.nn.functional as F

from moe.combine import slot_sum, slot_sum_to_map
from moe.dispatch import DispatchPlan
from moe.fused_ffn import buckets_of, expert_ffn
from moe.units import PatchView, make_grid, patchify, pool_units, take_units, unpatchify

TOL = dict(rtol=1e-5, atol=1e-5)


def _ffn_loop(x, w1, b1, w2, b2, counts):
    outs, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start:start + n]
        outs.append(F.gelu(xe @ w1[e] + b1[e]) @ w2[e] + b2[e])
        start += n
    return torch.cat(outs)


def _leaves(*shapes, dtype=torch.float32):
    return [torch.randn(*s, dtype=dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("counts", [[5, 0, 3, 9], [0, 0, 0, 4], [2, 2, 2, 2], [4, 4, 0, 4, 7, 1, 7]])
def test_fused_ffn_matches_per_expert_modules(counts):
    c, f, e = 6, 10, len(counts)
    t = sum(counts)
    mine = _leaves((t, c), (e, c, f), (e, f), (e, f, c), (e, c))
    ref = [p.detach().clone().requires_grad_() for p in mine]
    y = expert_ffn(*mine, counts)
    y_ref = _ffn_loop(*ref, counts)
    torch.testing.assert_close(y, y_ref, **TOL)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for name, a, b in zip(["x", "w1", "b1", "w2", "b2"], mine, ref):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=name)
    empty = [i for i, n in enumerate(counts) if n == 0]
    assert all(mine[1].grad[i].abs().sum() == 0 and mine[4].grad[i].abs().sum() == 0 for i in empty)


def _ffn_gemm_loop(x, w1, b1, w2, b2, counts):
    """The same BLAS calls one expert at a time (what the buckets batch): addmm, gelu, addmm."""
    x, w1, b1, w2, b2 = (t.detach() for t in (x, w1, b1, w2, b2))
    y, start = x.new_empty(x.shape[0], w2.shape[2]), 0
    for e, n in enumerate(counts):
        if n:
            torch.addmm(b2[e], F.gelu(torch.addmm(b1[e], x[start:start + n], w1[e])), w2[e],
                        out=y[start:start + n])
        start += n
    return y


def test_fused_ffn_buckets_equal_an_expert_by_expert_loop_bit_for_bit():
    """Buckets of equal row count (consecutive ids: views; scattered ids: gathers), values and gradients."""
    torch.manual_seed(0)
    counts = [64, 0, 128, 64, 64, 0, 0, 192, 64, 128, 0, 64]
    c, f, e = 32, 48, len(counts)
    assert {len(b.ids) > 1 and not b.consecutive for b in buckets_of(counts)} == {True, False}
    mine = _leaves((sum(counts), c), (e, c, f), (e, f), (e, f, c), (e, c))
    y = expert_ffn(*mine, counts)
    assert torch.equal(y, _ffn_gemm_loop(*mine, counts))
    ref = [p.detach().clone().requires_grad_() for p in mine]
    g = torch.randn_like(y)
    y.backward(g)
    _ffn_loop(*ref, counts).backward(g)
    for name, a, b in zip(["x", "w1", "b1", "w2", "b2"], mine, ref):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=name)
    idle = torch.tensor([n == 0 for n in counts])
    assert mine[1].grad[idle].abs().sum() == 0 and mine[2].grad[idle].abs().sum() == 0


def test_fused_ffn_without_input_grad_and_in_bf16():
    counts = [3, 4]
    x = torch.randn(7, 8)
    w1, b1, w2, b2 = _leaves((2, 8, 12), (2, 12), (2, 12, 8), (2, 8))
    expert_ffn(x, w1, b1, w2, b2, counts).sum().backward()  # x needs no gradient
    assert w1.grad is not None and x.grad is None
    ps = [p.detach().bfloat16() for p in (x, w1, b1, w2, b2)]
    y16 = expert_ffn(*ps, counts)
    y32 = _ffn_loop(*[p.float() for p in ps], counts)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="rows but the counts add up"):
        expert_ffn(x, w1, b1, w2, b2, [3, 3])


def _plan(n, k, e):
    """A dropless plan: every slot (n, k) gets a row, rows sorted by a random expert."""
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    order = torch.sort(ids.reshape(-1), stable=True).indices
    counts = torch.bincount(ids.reshape(-1), minlength=e)
    return DispatchPlan(order, counts, counts, None, n, k, num_rows=n * k)


def _weighted_index_add(rows_RD, w_NK, plan):
    w_R = w_NK.reshape(-1)[plan.slot_of_row]
    return torch.zeros(plan.num_units, rows_RD.shape[1]).index_add(0, plan.unit_of_row, rows_RD * w_R[:, None])


def _same_values_and_grads(out, ref, leaf_pairs):
    """out == ref, and after one backward of the same gradient, each leaf pair's grads agree."""
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    for mine, theirs in leaf_pairs:
        torch.testing.assert_close(mine.grad, theirs.grad, **TOL)


def test_slot_sum_matches_weighted_index_add():
    n, k, d = 9, 3, 5
    plan = _plan(n, k, 6)
    rows, w = _leaves((n * k, d), (n, k))
    rows2, w2 = (t.detach().clone().requires_grad_() for t in (rows, w))
    out, ref = slot_sum(rows, w, plan.slot_of_row), _weighted_index_add(rows2, w2, plan)
    _same_values_and_grads(out, ref, [(rows, rows2), (w, w2)])
    with pytest.raises(ValueError, match="a row for every slot"):
        slot_sum(rows[1:], w, plan.slot_of_row[1:])


def test_slot_sum_to_map_matches_unpatchify():
    b, h, wd, c, p, k = 2, 8, 12, 3, 4, 2
    grid = make_grid(torch.empty(b, h, wd, c), p)
    n = grid.num_units
    plan = _plan(n, k, 5)
    rows, w = _leaves((n * k, p * p, c), (n, k))
    rows2, w2 = (t.detach().clone().requires_grad_() for t in (rows, w))
    out = slot_sum_to_map(rows, w, plan.slot_of_row, grid)
    ref = unpatchify(_weighted_index_add(rows2.reshape(n * k, -1), w2, plan).view(n, p * p, c), grid)
    _same_values_and_grads(out, ref, [(rows, rows2), (w, w2)])


def test_patch_view_takes_and_pools_like_patchify():
    x = torch.randn(2, 8, 12, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    grid = make_grid(x, 4)
    view = PatchView.of(x, grid)
    assert view.shape == patchify(x2, grid).shape
    idx = torch.tensor([5, 0, 5, 11, 3])  # repeats: their gradients add up
    got, ref = take_units(view, idx), take_units(patchify(x2, grid), idx)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    pooled, pooled_ref = view.pooled(), pool_units(patchify(x2, grid), grid)
    torch.testing.assert_close(pooled, pooled_ref, **TOL)
    g1, g2 = torch.randn_like(got), torch.randn_like(pooled)
    ((got * g1).sum() + (pooled * g2).sum()).backward()
    ((ref * g1).sum() + (pooled_ref * g2).sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    with pytest.raises(ValueError, match="divisible"):
        PatchView.of(torch.randn(1, 6, 8, 2), make_grid(torch.randn(1, 6, 8, 2), 4))

"""The fused weighted sum of dropless top-k (moe/combine.py) against the plain per-unit loop and
against autograd through the general path: forward, the rows' and the weights' gradients, and the
variant that writes straight into the [B, H, W, C] map.

Legend: N units, K slots per unit, R = N*K rows, L points per unit, C channels.
"""

import pytest
import torch

from moe.combine import slot_sum, slot_sum_to_map
from moe.dispatch import plan_dispatch
from moe.units import make_grid, unpatchify
from tests.routing_stubs import fixed_decision


def _loop(rows_RD, w_NK, slot_of_row):
    """out[n] = sum_k w[n, k] * rows[r] for the row r of slot n*K + k."""
    n, k = w_NK.shape
    row_of_slot = {int(s): r for r, s in enumerate(slot_of_row)}
    return torch.stack([sum(w_NK[i, j] * rows_RD[row_of_slot[i * k + j]] for j in range(k)) for i in range(n)])


def _assert_same_values_and_grads(out, ref, leaves, ref_leaves):
    """Equal forward, and equal gradients of every leaf under the same upstream gradient."""
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("n,k,e", [(7, 2, 4), (5, 1, 3), (6, 3, 3)])
def test_slot_sum_equals_the_loop_with_gradients(n, k, e):
    plan = plan_dispatch(fixed_decision(n, k, e, seed=n), e, None)
    rows = torch.randn(n * k, 5, requires_grad=True)
    w = torch.rand(n, k, requires_grad=True)
    out = slot_sum(rows, w, plan.slot_of_row)
    rows2, w2 = rows.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = _loop(rows2, w2, plan.slot_of_row)
    _assert_same_values_and_grads(out, ref, (rows, w), (rows2, w2))


def test_slot_sum_needs_a_row_for_every_slot():
    plan = plan_dispatch(fixed_decision(3, 2, 4, seed=0), 4, None)
    with pytest.raises(ValueError, match="needs a row for every slot: 5 rows for 3x2 slots"):
        slot_sum(torch.randn(5, 2), torch.rand(3, 2), plan.slot_of_row[:5])


def test_writing_into_the_map_equals_the_sum_then_unpatchify():
    b, h, w_, c, p, k, e = 2, 4, 6, 3, 2, 2, 4
    grid = make_grid(torch.zeros(b, h, w_, c), p)  # unpadded: 4 x 6 in 2 x 2 patches
    n = grid.num_units
    plan = plan_dispatch(fixed_decision(n, k, e, seed=3), e, None)
    rows = torch.randn(n * k, p * p, c, requires_grad=True)
    wts = torch.rand(n, k, requires_grad=True)
    out = slot_sum_to_map(rows, wts, plan.slot_of_row, grid)
    rows2, w2 = rows.detach().clone().requires_grad_(True), wts.detach().clone().requires_grad_(True)
    ref = unpatchify(_loop(rows2.reshape(n * k, -1), w2, plan.slot_of_row).view(n, p * p, c), grid)
    _assert_same_values_and_grads(out, ref, (rows, wts), (rows2, w2))

"""Dispatch plans, the local dispatcher and the weighted sum (moe/dispatch.py) against a dense loop
over experts (tests/routing_stubs.py), with a fixed routing: kept rows sorted by expert, the
capacity cut in priority order, dead slots and dropped rows contributing nothing.

Legend: N units, K slots per unit, E experts, R kept rows, L points per unit, C channels.
"""

import pytest
import torch

from moe.dispatch import LocalDispatcher, expert_capacity, plan_dispatch, slot_counts, unpermute
from tests.routing_stubs import apply_experts, dense_reference, fixed_decision, kept_slots

L, C = 4, 3


@pytest.mark.parametrize("n,k,e,cf,dead,priority", [
    (9, 2, 4, None, 0.0, "order"), (9, 3, 5, None, 0.5, "order"), (12, 2, 4, 0.5, 0.0, "order"),
    (12, 2, 4, 0.5, 0.0, "score"), (7, 1, 3, 0.4, 0.0, "order"), (0, 2, 4, None, 0.0, "order"),
])
def test_local_dispatch_and_weighted_sum_equal_the_loop(n, k, e, cf, dead, priority):
    d = fixed_decision(n, k, e, seed=n + k, dead=dead)
    cap = expert_capacity(n, k, e, cf) if cf is not None else None
    plan = plan_dispatch(d, e, cap, priority)
    x = torch.randn(n, L, C, requires_grad=True)
    rows, counts, meta = LocalDispatcher(e).dispatch(x, plan)
    kept = kept_slots(d, e, cap, priority)
    assert meta.plan.num_rows == len(kept) == rows.shape[0]
    ids = d.expert_ids.reshape(-1)[meta.plan.slot_of_row]
    assert torch.equal(ids, ids.sort().values) and counts.tolist() == torch.bincount(ids, minlength=e).tolist()
    assert {(int(s) // k, int(s) % k) for s in meta.plan.slot_of_row} == kept
    assert torch.equal(rows, x.detach()[meta.plan.unit_of_row])
    y = unpermute(apply_experts(rows, counts.tolist(), 0), meta.plan, d.weights)
    y.square().sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    ref = dense_reference(xr, d, kept)
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-6)


def test_routed_counts_are_taken_before_the_cut_and_dead_slots_count_nowhere():
    d = fixed_decision(10, 3, 4, seed=1, dead=0.5)
    routed = slot_counts(d.expert_ids, d.slot_mask, 4)
    assert routed.tolist() == torch.bincount(d.expert_ids[d.slot_mask], minlength=4).tolist()
    plan = plan_dispatch(d, 4, 2)
    assert torch.equal(plan.routed, routed) and torch.equal(plan.counts, routed.clamp(max=2))


def test_the_row_count_is_known_without_a_read_only_in_dropless_top_k():
    assert plan_dispatch(fixed_decision(6, 2, 4, seed=0), 4, None).num_rows == 12
    assert plan_dispatch(fixed_decision(6, 2, 4, seed=0, dead=0.5), 4, None).num_rows is None
    plan = plan_dispatch(fixed_decision(6, 2, 4, seed=0), 4, 2)
    assert plan.num_rows is None
    with pytest.raises(RuntimeError, match="row count is not known yet"):
        plan.slot_of_row
    resolved, host = plan.host_counts()
    assert resolved.num_rows == sum(host) and host == plan.counts.tolist()


def test_capacity_is_the_ceiling_of_the_fair_share():
    assert expert_capacity(10, 2, 4, 1.0) == 5 and expert_capacity(10, 2, 4, 0.5) == 3
    assert expert_capacity(0, 2, 4, 1.0) == 1  # never zero: an expert always takes a row

"""The all-to-all dispatcher (parallel/dispatcher.py) among N simulated ranks in one process
(tests/fake_dist.py), against a dense loop over experts (tests/routing_stubs.py): every row
reaches the right expert on the right rank, comes back in plan order, and the weighted sum per
unit (gradients included) equals the loop's. The same under torchrun: tests/integration/test_dispatcher.py.

Legend: P ranks, E experts, K slots per unit, N units per rank, L points per unit, C channels.
"""

import pytest
import torch

from moe import PatchMoE, PatchMoEConfig, RouterConfig
from moe.dispatch import LocalDispatcher, plan_dispatch, unpermute
from moe.timing import WallTimer
from parallel.all_to_all import CommCounter
from parallel.dispatcher import AllToAllDispatcher, build_dispatcher
from tests.fake_dist import expert_group, run_ranks
from tests.routing_stubs import (FixedRouter, apply_experts, dense_reference, expected_rows, fixed_decision,
                                 kept_slots)

L, C = 4, 3
CASES = [  # P, E, K, capacity factor, dead slot fraction, units per rank
    (2, 4, 2, None, 0.0, [5, 7]),
    (3, 6, 2, None, 0.0, [4, 0, 6]),  # rank 1 sends nothing and still receives
    (4, 8, 3, None, 0.5, [6, 5, 3, 4]),  # dynamic k: the row count read with the split sizes
    (2, 4, 2, 0.5, 0.0, [8, 6]),  # capacity: overflow dropped
    (2, 2, 1, 0.75, 0.0, [5, 5]),
]


def _rank_inputs(rank: int, n: int):
    x = torch.randn(n, L, C, generator=torch.Generator().manual_seed(100 + rank), requires_grad=True)
    return x


def _run_rank(rank, group, case, timer=None):
    p, e, k, cf, dead, sizes = case
    ep = expert_group(group, rank, e)
    disp = AllToAllDispatcher(ep, CommCounter(), timer)
    x = _rank_inputs(rank, sizes[rank])
    decision = fixed_decision(sizes[rank], k, e, seed=rank, dead=dead)
    cap = disp.capacity(sizes[rank], k, e, cf) if cf is not None else None
    plan = plan_dispatch(decision, e, cap)
    rows_ULC, counts_El, meta = disp.dispatch(x, plan)
    out_ULC = apply_experts(rows_ULC, meta.host_counts, ep.first_expert)
    y = unpermute(disp.combine(out_ULC, meta), meta.plan, decision.weights)
    y.square().sum().backward()
    return {"x": x, "decision": decision, "cap": cap, "plan": meta.plan, "rows": rows_ULC.detach(),
            "counts": counts_El.tolist(), "host_counts": meta.host_counts, "y": y.detach(), "grad": x.grad,
            "first": ep.first_expert, "local": ep.num_local_experts, "bytes": disp.counter.total_bytes}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "P{}-E{}-K{}-cf{}-dead{}".format(*c[:5]))
def test_rows_reach_their_experts_and_come_back_weighted(case):
    p, e, k, cf, dead, sizes = case
    ranks = run_ranks(p, lambda rank, group: _run_rank(rank, group, case))
    xs, plans = [r["x"].detach() for r in ranks], [r["plan"] for r in ranks]
    caps = {r["cap"] for r in ranks}
    assert len(caps) == 1  # every rank cuts at the same capacity (the largest unit count's)
    for r in ranks:
        want = expected_rows(xs, plans, r["first"], r["local"])
        assert r["counts"] == r["host_counts"] == [w.shape[0] for w in want]
        assert torch.equal(r["rows"], torch.cat(want))  # expert-major, each expert's rows source-major
    for rank, r in enumerate(ranks):
        kept = kept_slots(r["decision"], e, r["cap"])
        x = r["x"].detach().requires_grad_(True)
        ref = dense_reference(x, r["decision"], kept)
        ref.square().sum().backward()
        torch.testing.assert_close(r["y"], ref.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["grad"], x.grad, rtol=1e-6, atol=1e-6)
        assert r["plan"].num_rows == len(kept)  # resolved from the counts when not known before
    row_bytes = L * C * 4
    assert sum(r["bytes"] for r in ranks) == 4 * sum(r["plan"].num_rows for r in ranks) * row_bytes  # 2 ways x fwd/bwd


def test_each_step_is_timed_inside_the_layers_stages():
    case = CASES[0]
    timers = [WallTimer(cuda_sync=False) for _ in range(case[0])]
    run_ranks(case[0], lambda rank, group: _run_rank(rank, group, case, timers[rank]))
    for t in timers:
        assert set(t.calls) == {"dispatch.counts", "dispatch.send", "dispatch.regroup", "combine.regroup",
                                "combine.send"}
        assert all(n == 1 for n in t.calls.values()) and all(s >= 0 for s in t.seconds.values())


def test_the_one_host_read_happens_in_the_counts_step():
    case = CASES[2]  # dynamic k: the plan's row count is unknown before the counts step
    p, e, k, _, dead, sizes = case

    def body(rank, group):
        disp = AllToAllDispatcher(expert_group(group, rank, e))
        plan = plan_dispatch(fixed_decision(sizes[rank], k, e, seed=rank, dead=dead), e, None)
        assert plan.num_rows is None
        splits = disp.exchange_counts(plan)
        assert group.calls == ["all_to_all_single"] if rank == 0 else True  # the counts, nothing else yet
        return splits

    splits = run_ranks(p, body)
    for rank, s in enumerate(splits):
        assert s.plan.num_rows == sum(s.send_splits)
        assert s.recv_splits == [other.send_splits[rank] for other in splits]
        assert s.host_counts == s.recv_PE.sum(0).tolist()


def test_build_dispatcher_is_local_on_one_rank():
    def body(rank, group):
        return build_dispatcher(expert_group(group, rank, 4))

    assert isinstance(run_ranks(1, body)[0], LocalDispatcher)
    assert all(isinstance(d, AllToAllDispatcher) and d.num_local_experts == 2 for d in run_ranks(2, body))


@pytest.mark.parametrize("keep_fraction,pruned_output", [(1.0, "identity"), (0.5, "identity"), (0.5, "zero")])
def test_patch_moe_on_two_ranks_equals_it_on_one(keep_fraction, pruned_output):
    """The whole layer with a fixed router: EP=2 over the fake group == all experts local, pruned patches too."""
    cfg = PatchMoEConfig(dim=C, patch_size=2, keep_fraction=keep_fraction, pruned_output=pruned_output,
                         router=RouterConfig(num_experts=4, top_k=2))
    torch.manual_seed(0)
    full = PatchMoE(cfg)
    full.router = FixedRouter(C, 4, 2)
    full.eval()  # the experts' dropout off: both sides compute the same
    xs = [torch.randn(2, 4, 6, C, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    refs = [full(x).out for x in xs]

    def body(rank, group):
        ep = expert_group(group, rank, 4)
        layer = PatchMoE(cfg, dispatcher=AllToAllDispatcher(ep))
        layer.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("experts.")},
                              strict=False)
        with torch.no_grad():
            for name, prm in layer.experts.named_parameters():
                prm.copy_(full.experts.get_parameter(name)[ep.first_expert:ep.first_expert + ep.num_local_experts])
        layer.router = FixedRouter(C, 4, 2)
        return layer.eval()(xs[rank]).out

    for out, ref in zip(run_ranks(2, body), refs):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

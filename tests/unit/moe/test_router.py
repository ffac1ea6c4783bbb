import pytest
import torch

from moe.config import RouterConfig
from moe.router import Router
from tests.reference import route_unit


def _check_against_reference(router, x):
    dec = router(x)
    for n in range(x.shape[0]):
        routes, probs = route_unit(router, x[n])
        k_live = int(dec.slot_mask[n].sum())
        assert k_live == len(routes)
        assert dec.expert_ids[n, :k_live].tolist() == [e for e, _ in routes]
        torch.testing.assert_close(dec.weights[n, :k_live], torch.stack([w for _, w in routes]), rtol=1e-5, atol=1e-6)
        assert torch.all(dec.weights[n, k_live:] == 0)
        torch.testing.assert_close(dec.probs[n], probs, rtol=1e-5, atol=1e-6)
    return dec


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_experts=8, top_k=2),
        dict(num_experts=8, top_k=1, normalize_topk=False),
        dict(num_experts=8, top_k=3, score_fn="sigmoid"),
        dict(num_experts=8, top_k=3, score_fn="sigmoid", normalize_topk=False),
        dict(num_experts=6, top_k=6),  # k = num_experts
        dict(num_experts=8, top_k=2, temperature=0.5),
        dict(num_experts=8, top_k=2, num_heads=3, gate_depth=2),
        dict(num_experts=8, top_k=2, gate_depth=3, gate_hidden=12),
        dict(num_experts=8, dynamic_top_p=0.6, k_min=1, k_max=4),
        dict(num_experts=8, dynamic_top_p=0.9, k_min=2),
    ],
)
def test_router_matches_loop_reference(kw):
    router = Router(RouterConfig(**kw), input_dim=16).eval()
    x = torch.randn(40, 16)
    dec = _check_against_reference(router, x)
    if "dynamic_top_p" in kw:
        ks = dec.slot_mask.sum(-1)
        assert ks.min() >= kw["k_min"] and ks.max() <= router.cfg.max_k
        assert len(set(ks.tolist())) > 1, "dynamic k should vary across units"


def test_ties_go_to_lower_expert_index():
    router = Router(RouterConfig(num_experts=6, top_k=3), input_dim=4).eval()
    with torch.no_grad():  # all-zero gate: every expert scores exactly 1/6
        for p in router.gate.weights.parameters():
            p.zero_()
        for p in router.gate.biases.parameters():
            p.zero_()
    dec = _check_against_reference(router, torch.randn(5, 4))
    assert dec.expert_ids.tolist() == [[0, 1, 2]] * 5
    torch.testing.assert_close(dec.weights, torch.full((5, 3), 1 / 3))
    # partial tie: experts 1 and 4 tie above the rest
    with torch.no_grad():
        router.gate.biases[0][0, 0, 1] = 2.0
        router.gate.biases[0][0, 0, 4] = 2.0
    dec = _check_against_reference(router, torch.randn(5, 4))
    assert dec.expert_ids[:, :2].tolist() == [[1, 4]] * 5


def test_bias_changes_selection_not_weights():
    cfg = RouterConfig(num_experts=4, top_k=1, normalize_topk=False, bias_update_rate=0.5)
    router = Router(cfg, input_dim=8).eval()
    x = torch.randn(64, 8)
    before = router(x)
    router.update_bias(torch.bincount(before.expert_ids[:, 0], minlength=4))
    after = _check_against_reference(router, x)
    # selected weights are the plain probs of the chosen expert, bias excluded
    torch.testing.assert_close(after.weights[:, 0], after.probs.gather(1, after.expert_ids)[:, 0])
    # the bias moved load away from the busiest expert
    busiest = torch.bincount(before.expert_ids[:, 0], minlength=4).argmax()
    assert (after.expert_ids == busiest).sum() < (before.expert_ids == busiest).sum()


def test_bias_update_direction():
    router = Router(RouterConfig(num_experts=4, bias_update_rate=0.1), input_dim=8)
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    torch.testing.assert_close(router.selection_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    torch.testing.assert_close(router.selection_bias, torch.tensor([-0.2, 0.2, 0.0, 0.0]))


def test_fp32_router_math_for_bf16_input():
    router = Router(RouterConfig(num_experts=8, top_k=2), input_dim=16).to(torch.bfloat16)
    x = torch.randn(10, 16).bfloat16()
    dec = router(x)
    assert dec.logits.dtype == torch.float32 and dec.weights.dtype == torch.float32
    ref = Router(RouterConfig(num_experts=8, top_k=2), input_dim=16)
    ref.load_state_dict({k: v.float() for k, v in router.state_dict().items()})
    torch.testing.assert_close(dec.probs, ref(x.float()).probs)


@pytest.mark.parametrize("noise", ["gaussian", "jitter"])
def test_noise_only_in_training(noise):
    router = Router(RouterConfig(num_experts=8, top_k=2, noise=noise, noise_std=1.0, jitter_eps=0.2), input_dim=16)
    x = torch.randn(200, 16)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.weights, b.weights)
    router.train()
    c = router(x)
    assert not torch.equal(a.expert_ids, c.expert_ids)


def test_gate_gradient_flows_through_weights():
    router = Router(RouterConfig(num_experts=4, top_k=2, gate_depth=2, num_heads=2), input_dim=8)
    dec = router(torch.randn(10, 8))
    (dec.weights * torch.randn(10, 2)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.gate.weights)


def test_dynamic_k_takes_the_fewest_experts_reaching_p_exactly():
    router = Router(RouterConfig(num_experts=4, dynamic_top_p=0.5, k_min=1), input_dim=4)
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25], [0.125, 0.375, 0.25, 0.25]])
    ids, mask = router._select(probs)
    assert mask.sum(-1).tolist() == [1, 2, 2]  # 0.5 reaches p alone; 0.25 + 0.25 reaches it
    assert ids[2, :2].tolist() == [1, 2]

"""Persistent expert-gradient buffers (moe/grad_buffers.py): bit-identical to fresh gradients."""

import torch

from moe import ExpertConfig, PatchMoE, PatchMoEConfig, RouterConfig
from moe.fused_ffn import expert_ffn
from moe.grad_buffers import ExpertGradBuffers


def _params(e=6, c=8, f=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in ((e, c, f), (e, f), (e, f, c), (e, c))]


def _grads(ps, counts, buffers, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), ps[0].shape[1], generator=g)
    dy = torch.randn(sum(counts), ps[0].shape[1], generator=g)
    (expert_ffn(x, *ps, counts, buffers) * dy).sum().backward()
    out = [p.grad.clone() for p in ps]
    return out


def test_buffers_give_the_fresh_path_bit_for_bit_as_the_active_experts_change():
    fresh, kept = _params(), _params()
    buffers = ExpertGradBuffers()
    first = None
    # expert 1 and 4 active, then idle (their slices must come back zero), then others, then all
    for step, counts in enumerate([[0, 5, 0, 0, 3, 0], [2, 0, 0, 4, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]):
        want = _grads(fresh, counts, None, step)
        got = _grads(kept, counts, buffers, step)
        for a, b in zip(want, got):
            assert torch.equal(a, b), step
        assert kept[0].grad.data_ptr() == buffers._bufs[id(kept[0])].data_ptr()  # adopted, not copied
        first = buffers._bufs[id(kept[0])] if first is None else first
        assert buffers._bufs[id(kept[0])] is first  # the same memory, step after step
        for p in fresh + kept:
            p.grad = None


def test_accumulating_grads_are_summed_not_overwritten():
    fresh, kept = _params(), _params()
    buffers = ExpertGradBuffers()
    for seed, counts in enumerate([[0, 5, 0, 0, 3, 0], [2, 5, 0, 0, 0, 1]]):  # two micro-batches, no zeroing
        _grads(fresh, counts, None, seed)
        _grads(kept, counts, buffers, seed)
    for a, b in zip(fresh, kept):
        assert torch.equal(a.grad, b.grad)


def test_patch_moe_training_steps_match_fresh_gradients():
    """Values and every gradient (empty experts included) over steps, PatchMoE with fused experts."""
    cfg = PatchMoEConfig(dim=8, patch_size=2, router=RouterConfig(num_experts=16, top_k=2),
                         expert=ExpertConfig(kind="ffn", hidden_dim=16, impl="fused"))
    torch.manual_seed(0)
    a = PatchMoE(cfg)
    b = PatchMoE(cfg)
    b.load_state_dict(a.state_dict())
    a.experts.grad_buffers = None  # the fresh-tensor path
    for step in range(3):
        x = torch.randn(2, 4, 6, 8)
        for layer in (a, b):
            layer.zero_grad(set_to_none=True)
            layer(x).out.square().sum().backward()
        assert (b.experts.w1.grad.flatten(1).abs().sum(1) == 0).any()  # some experts idle this step
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(pa.grad, pb.grad), (step, name)


def test_a_gradient_still_held_is_never_overwritten():
    """torch.autograd.grad hands the gradients to the caller (no .grad): a second backward must not write
    into what the first returned."""
    ps = _params()
    buffers = ExpertGradBuffers()
    x = torch.randn(8, 8)
    one = torch.autograd.grad(expert_ffn(x, *ps, [0, 5, 0, 0, 3, 0], buffers).sum(), ps)
    kept = [g.clone() for g in one]
    torch.autograd.grad((2 * expert_ffn(x, *ps, [2, 0, 0, 4, 0, 2], buffers)).sum(), ps)
    for a, b in zip(one, kept):
        assert torch.equal(a, b)

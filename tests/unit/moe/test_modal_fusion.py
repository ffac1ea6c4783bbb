"""HierarchicalFusion (scale experts per modality, fine gate per modality, cross-modal coarse gate)
against a loop reference: one image, one modality, one scale at a time."""

import pytest
import torch

from common.config import ConfigError
from moe import ExpertConfig, HierarchicalFusion, HierarchicalFusionConfig, window_features
from tests.reference import experts_to_modules, gate_head_logits, modules_grads, route_unit


def _cfg(ec=1, k=1, heads=1, kind="seed", m=3, scales=(1, 2, 4)):
    return HierarchicalFusionConfig(dim=8, scales=scales, num_modalities=m, experts_per_cell=ec, top_k=k,
                                    expert=ExpertConfig(kind=kind, hidden_dim=16, dropout=0.0), num_heads=heads,
                                    temperature=0.7, dropout=0.0)


def _soft(gate, x, heads, temperature, bias=None):
    logits = [gate_head_logits(gate, h, x) for h in range(heads)]
    if bias is not None:
        logits = [lg + bias for lg in logits]
    return sum(torch.softmax(lg / temperature, -1) for lg in logits) / heads


def fusion_reference(layer, f_MSBD, present, expert_mods):
    """-> fused [B, D] and joint weights [B, M*S], image by image."""
    cfg = layer.cfg
    mp, s, b, d = f_MSBD.shape
    outs, joints = [], []
    for bi in range(b):
        z, fine = [], []
        for i, m in enumerate(present):
            y = []
            for j in range(s):
                f = f_MSBD[i, j, bi]
                first = (m * s + j) * cfg.experts_per_cell
                if layer.cell_routers is None:
                    routes = [(0, torch.tensor(1.0))]
                else:
                    routes, _ = route_unit(layer.cell_routers[m * s + j], f)
                y.append(sum(w * expert_mods[first + e](f.unsqueeze(0))[0] for e, w in routes))
            w = _soft(layer.fine_gates[m], torch.cat([f_MSBD[i, j, bi] for j in range(s)]), cfg.num_heads,
                      cfg.temperature)
            fine.append(w)
            z.append(sum(w[j] * y[j] for j in range(s)))
        ctx = sum(z) / len(z)
        logits = [torch.cat([gate_head_logits(layer.coarse_gate, h, torch.cat([zm, ctx])) + layer.modality_bias[m]
                             for zm, m in zip(z, present)]) for h in range(cfg.num_heads)]
        a = sum(torch.softmax(lg / cfg.temperature, -1) for lg in logits) / cfg.num_heads
        outs.append(sum(a[i] * z[i] for i in range(len(present))))
        joint = torch.zeros(cfg.num_modalities, s)
        for i, m in enumerate(present):
            joint[m] = a[i] * fine[i]
        joints.append(joint.flatten())
    return torch.stack(outs), torch.stack(joints)


@pytest.mark.parametrize("ec,k,heads,present,kind", [
    (1, 1, 1, (0, 1, 2), "seed"), (1, 1, 2, (0, 2), "ffn"), (3, 2, 1, (0, 1, 2), "seed"), (2, 1, 2, (2,), "ffn"),
    (3, 1, 1, (1, 0), "seed"),
])
def test_matches_loop_reference(ec, k, heads, present, kind):
    torch.manual_seed(0)
    layer = HierarchicalFusion(_cfg(ec, k, heads, kind))
    mods = experts_to_modules(kind, layer.experts)
    f = torch.randn(len(present), 3, 5, 8)
    fr = f.clone().requires_grad_()
    f.requires_grad_()
    res = layer.fuse(f, present)
    g = torch.randn_like(res.out)
    (res.out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None and "experts" not in n}
    expert_grads = {n: p.grad.clone() for n, p in layer.experts.named_parameters()}
    layer.zero_grad()
    ref, joint = fusion_reference(layer, fr, present, mods)
    (ref * g).sum().backward()
    torch.testing.assert_close(res.out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.weights, joint, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f.grad, fr.grad, rtol=1e-4, atol=1e-5)
    assert grads, "the gates received no gradient"
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(layer.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)
    ref_grads = modules_grads(kind, mods)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(expert_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_absent_modality_is_not_routed_and_weights_renormalise():
    torch.manual_seed(0)
    layer = HierarchicalFusion(_cfg(ec=2, k=1))
    f = torch.randn(2, 3, 4, 8, requires_grad=True)
    res = layer.fuse(f, (0, 2))
    assert torch.isfinite(res.out).all()
    w = res.weights.view(4, 3, 3)
    torch.testing.assert_close(w.sum((1, 2)), torch.ones(4))  # renormalised over the present two
    assert (w[:, 1] == 0).all()
    res.out.sum().backward()
    nir = slice(3 * 2, 6 * 2)  # experts of modality 1 (3 scales x 2 experts)
    assert all(p.grad[nir].abs().sum() == 0 for p in layer.experts.parameters())
    assert all(p.grad[:6].abs().sum() > 0 for p in layer.experts.parameters())
    assert layer.fine_gates[1].weights[0].grad is None


def test_forward_is_fuse_of_window_features():
    torch.manual_seed(0)
    layer = HierarchicalFusion(_cfg(scales=(2, 4, 8)))
    x = torch.randn(2 * 3, 8, 8, 8)  # two present modalities x 3 images, modality-major
    feats = torch.stack(window_features(x, (2, 4, 8))).view(3, 2, 3, 8).transpose(0, 1)
    torch.testing.assert_close(layer(x, (1, 2)).out, layer.fuse(feats, (1, 2)).out)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="top_k=3 must be in"):
        _cfg(ec=2, k=3)
    layer = HierarchicalFusion(_cfg())
    with pytest.raises(ValueError, match="distinct modalities"):
        layer.fuse(torch.randn(2, 3, 2, 8), (0, 0))

"""Plain, loop-based references written from the seed documents, for the tests to compare with.

Nothing here is fast or batched: every unit and every expert is visited in a Python loop, the
seed's modules are used as the seed writes them, and weights are copied in from the batched
layers (and gradients copied back out) so both sides can be compared parameter by parameter.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- the thesis code's multi-scale fusion, as written there ----------------------------------------
class ExpertNetwork(nn.Module):
    def __init__(self, input_dim=512, hidden_dim=1024, output_dim=512, dropout=0.1):
        super().__init__()
        self.expert = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, output_dim),
            nn.LayerNorm(output_dim),
            nn.GELU(),
            nn.Dropout(dropout),
        )
        self.residual_proj = nn.Linear(input_dim, output_dim)

    def forward(self, x):
        return self.expert(x) + self.residual_proj(x)


class GatingNetwork(nn.Module):
    def __init__(self, input_dim=1536, num_experts=3, temperature=1.0, dropout=0.1):
        super().__init__()
        self.gate = nn.Sequential(
            nn.Linear(input_dim, input_dim // 2),
            nn.LayerNorm(input_dim // 2),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(input_dim // 2, num_experts),
        )
        self.temperature = temperature

    def forward(self, x):
        gate_scores = self.gate(x) / self.temperature
        return F.softmax(gate_scores, dim=-1)


class MultiHeadGatingNetwork(nn.Module):
    def __init__(self, input_dim, num_experts, num_heads=4, temperature=1.0, dropout=0.1):
        super().__init__()
        self.heads = nn.ModuleList(
            [GatingNetwork(input_dim, num_experts, temperature, dropout) for _ in range(num_heads)]
        )

    def forward(self, x):
        head_weights = [head(x) for head in self.heads]
        return torch.mean(torch.stack(head_weights), dim=0)


class SeedMultiScaleMoE(nn.Module):
    def __init__(self, gating_network, experts):
        super().__init__()
        self.gating_network = gating_network
        self.experts = nn.ModuleList(experts)

    def forward(self, multi_scale_features):
        concat_features = torch.cat(multi_scale_features, dim=1)
        expert_weights = self.gating_network(concat_features)
        expert_outputs = [expert(feat) for expert, feat in zip(self.experts, multi_scale_features)]
        weighted_outputs = [weight.unsqueeze(-1) * output for weight, output in zip(expert_weights.T, expert_outputs)]
        fused_feature = torch.sum(torch.stack(weighted_outputs), dim=0)
        return fused_feature, expert_weights


def copy_gate_into_seed(gate, seed_gate, head=0):
    """Load head `head` of our GateNetwork into one seed GatingNetwork (Linear-LN-GELU-Drop-Linear)."""
    lin = [m for m in seed_gate.gate if isinstance(m, nn.Linear)]
    ln = [m for m in seed_gate.gate if isinstance(m, nn.LayerNorm)]
    with torch.no_grad():
        for i, m in enumerate(lin):
            m.weight.copy_(gate.weights[i][head].T)
            m.bias.copy_(gate.biases[i][head, 0])
        for i, m in enumerate(ln):
            m.weight.copy_(gate.norm_w[i][head, 0])
            m.bias.copy_(gate.norm_b[i][head, 0])


def seed_gate_grads(seed_gate) -> dict[str, torch.Tensor]:
    """Gradients of one seed GatingNetwork in our GateNetwork's layout (one head): weights.i, ..."""
    lin = [m for m in seed_gate.gate if isinstance(m, nn.Linear)]
    ln = [m for m in seed_gate.gate if isinstance(m, nn.LayerNorm)]
    out = {}
    for i, m in enumerate(lin):
        out[f"weights.{i}"], out[f"biases.{i}"] = m.weight.grad.T[None], m.bias.grad[None, None]
    for i, m in enumerate(ln):
        out[f"norm_w.{i}"], out[f"norm_b.{i}"] = m.weight.grad[None, None], m.bias.grad[None, None]
    return out


def multiscale_to_seed(ours):
    """The thesis code's MultiScaleMoE (its gate and one ExpertNetwork per scale) holding copies of the
    weights of our MultiScaleMoE; -> (seed model, list of experts)."""
    cfg = ours.cfg
    s, d = len(cfg.scales), cfg.dim
    if cfg.num_heads == 1:
        gate = GatingNetwork(s * d, s, cfg.temperature, dropout=0.0)
        copy_gate_into_seed(ours.gate, gate)
    else:
        gate = MultiHeadGatingNetwork(s * d, s, cfg.num_heads, cfg.temperature, dropout=0.0)
        for h, head in enumerate(gate.heads):
            copy_gate_into_seed(ours.gate, head, h)
    experts = seed_experts_to_modules(ours.experts, dropout=0.0)
    return SeedMultiScaleMoE(gate, experts), experts


def expert_balance_loss(expert_weights):
    expert_usage = torch.mean(expert_weights, dim=0)
    return torch.var(expert_usage)


# ---- weight copies between batched layers and per-expert references -------------------------
def seed_experts_to_modules(stacked, dropout=0.0) -> list[ExpertNetwork]:
    """One ExpertNetwork per expert of a ResidualMLPExperts, holding copies of its weights."""
    e, d, both = stacked.w_in.shape
    f, out = stacked.hidden, stacked.out_dim
    mods = []
    with torch.no_grad():
        for i in range(e):
            m = ExpertNetwork(d, f, out, dropout)
            m.expert[0].weight.copy_(stacked.w_in[i][:, :f].T)
            m.expert[0].bias.copy_(stacked.b_in[i][:f])
            m.expert[1].weight.copy_(stacked.ln1_w[i])
            m.expert[1].bias.copy_(stacked.ln1_b[i])
            m.expert[4].weight.copy_(stacked.w_out[i].T)
            m.expert[4].bias.copy_(stacked.b_out[i])
            m.expert[5].weight.copy_(stacked.ln2_w[i])
            m.expert[5].bias.copy_(stacked.ln2_b[i])
            m.residual_proj.weight.copy_(stacked.w_in[i][:, f:].T)
            m.residual_proj.bias.copy_(stacked.b_in[i][f:])
            mods.append(m)
    return mods


def seed_modules_grads(mods: list[ExpertNetwork]) -> dict[str, torch.Tensor]:
    """Gradients of per-expert references in the stacked layout of ResidualMLPExperts."""
    def g(p):
        return p.grad if p.grad is not None else torch.zeros_like(p)

    return {
        "w_in": torch.stack([torch.cat([g(m.expert[0].weight).T, g(m.residual_proj.weight).T], 1) for m in mods]),
        "b_in": torch.stack([torch.cat([g(m.expert[0].bias), g(m.residual_proj.bias)]) for m in mods]),
        "ln1_w": torch.stack([g(m.expert[1].weight) for m in mods]),
        "ln1_b": torch.stack([g(m.expert[1].bias) for m in mods]),
        "w_out": torch.stack([g(m.expert[4].weight).T for m in mods]),
        "b_out": torch.stack([g(m.expert[4].bias) for m in mods]),
        "ln2_w": torch.stack([g(m.expert[5].weight) for m in mods]),
        "ln2_b": torch.stack([g(m.expert[5].bias) for m in mods]),
    }


class FFN(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def ffn_experts_to_modules(stacked) -> list[FFN]:
    e, d, f = stacked.w1.shape
    mods = []
    with torch.no_grad():
        for i in range(e):
            m = FFN(d, f)
            m.fc1.weight.copy_(stacked.w1[i].T), m.fc1.bias.copy_(stacked.b1[i])
            m.fc2.weight.copy_(stacked.w2[i].T), m.fc2.bias.copy_(stacked.b2[i])
            mods.append(m)
    return mods


def ffn_modules_grads(mods) -> dict[str, torch.Tensor]:
    def g(p):
        return p.grad if p.grad is not None else torch.zeros_like(p)

    return {
        "w1": torch.stack([g(m.fc1.weight).T for m in mods]), "b1": torch.stack([g(m.fc1.bias) for m in mods]),
        "w2": torch.stack([g(m.fc2.weight).T for m in mods]), "b2": torch.stack([g(m.fc2.bias) for m in mods]),
    }


class ConvExpert(nn.Module):
    """Conv3x3 - GELU - Conv3x3 on one [C, P, P] patch (zero padding at the patch border)."""

    def __init__(self, c, f):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, f, 3, padding=1), nn.Conv2d(f, c, 3, padding=1)

    def forward(self, patch_LC):  # [P*P, C] -> [P*P, C]
        p = math.isqrt(patch_LC.shape[0])
        x = patch_LC.T.reshape(1, -1, p, p)
        y = self.conv2(F.gelu(self.conv1(x)))
        return y.reshape(-1, p * p).T


def conv_experts_to_modules(stacked) -> list[ConvExpert]:
    e, c9, f = stacked.w1.shape
    c = c9 // 9
    mods = []
    with torch.no_grad():
        for i in range(e):
            m = ConvExpert(c, f)
            m.conv1.weight.copy_(stacked.w1[i].T.reshape(f, c, 3, 3)), m.conv1.bias.copy_(stacked.b1[i])
            m.conv2.weight.copy_(stacked.w2[i].T.reshape(c, f, 3, 3)), m.conv2.bias.copy_(stacked.b2[i])
            mods.append(m)
    return mods


def conv_modules_grads(mods) -> dict[str, torch.Tensor]:
    def g(p):
        return p.grad if p.grad is not None else torch.zeros_like(p)

    return {
        "w1": torch.stack([g(m.conv1.weight).reshape(m.conv1.out_channels, -1).T for m in mods]),
        "b1": torch.stack([g(m.conv1.bias) for m in mods]),
        "w2": torch.stack([g(m.conv2.weight).reshape(m.conv2.out_channels, -1).T for m in mods]),
        "b2": torch.stack([g(m.conv2.bias) for m in mods]),
    }


def experts_to_modules(kind: str, stacked):
    return {"seed": seed_experts_to_modules, "ffn": ffn_experts_to_modules, "conv": conv_experts_to_modules}[kind](stacked)


def modules_grads(kind: str, mods):
    return {"seed": seed_modules_grads, "ffn": ffn_modules_grads, "conv": conv_modules_grads}[kind](mods)


# ---- gate: one head at a time, Linear by Linear -----------------------------------------------
def gate_head_logits(gate, head: int, x_D: torch.Tensor) -> torch.Tensor:
    """One unit through one head of a GateNetwork, written layer by layer."""
    h = x_D.to(torch.promote_types(x_D.dtype, torch.float32))  # fp32, or fp64 for a float64 reference
    n_layers = len(gate.weights)
    for i in range(n_layers):
        h = h @ gate.weights[i][head] + gate.biases[i][head, 0]
        if i < n_layers - 1:
            mu, var = h.mean(), h.var(unbiased=False)
            h = (h - mu) / torch.sqrt(var + 1e-5) * gate.norm_w[i][head, 0] + gate.norm_b[i][head, 0]
            h = F.gelu(h)
    return h


# ---- routing, one unit at a time --------------------------------------------------------------
def route_unit(router, x_D: torch.Tensor):
    """The thesis's Patch-MoE, step 2 (routing) for one pooled unit: -> (list of (expert, weight)), probs [E]."""
    cfg = router.cfg
    heads = [gate_head_logits(router.gate, h, x_D) / cfg.temperature for h in range(cfg.num_heads)]
    scores = [torch.softmax(l, -1) if cfg.score_fn == "softmax" else torch.sigmoid(l) for l in heads]
    probs = sum(scores) / len(scores)
    sel = [float(probs[e].detach()) + float(router.selection_bias[e]) for e in range(cfg.num_experts)]
    ranked = sorted(range(cfg.num_experts), key=lambda e: (-sel[e], e))  # ties: lower index
    if cfg.dynamic_top_p is None:
        chosen = ranked[: cfg.top_k]
    else:
        chosen, mass = [], 0.0
        for e in ranked:
            if len(chosen) >= cfg.max_k:
                break
            if len(chosen) >= cfg.k_min and mass >= cfg.dynamic_top_p:
                break
            chosen.append(e)
            mass += float(probs[e].detach())
    w = [probs[e] for e in chosen]
    if cfg.normalize_topk:
        total = sum(w)
        w = [x / total for x in w]
    return list(zip(chosen, w)), probs


def capacity_keep(routes: list[list[tuple[int, torch.Tensor]]], num_experts: int, capacity, priority: str):
    """Which (unit, slot) pairs survive the capacity cut, visiting slots in priority order."""
    slots = [(n, k) for k in range(max(len(r) for r in routes)) for n in range(len(routes)) if k < len(routes[n])]
    if priority == "score":
        slots = sorted(slots, key=lambda s: -float(routes[s[0]][s[1]][1].detach()))  # stable: ties keep order
    used = [0] * num_experts
    keep = set()
    for n, k in slots:
        e = routes[n][k][0]
        if capacity is None or used[e] < capacity:
            used[e] += 1
            keep.add((n, k))
    return keep


def cut_patches(x_BHWC: torch.Tensor, p: int):
    """Every P x P patch, image by image in grid order (zero-padded at the border) [P*P, C], and its
    pooled mean over the real points only [C] -> (patches per column nh, per row nw, patches, pooled)."""
    b, h, w, c = x_BHWC.shape
    nh, nw = -(-h // p), -(-w // p)
    padded = F.pad(x_BHWC, (0, 0, 0, nw * p - w, 0, nh * p - h))
    patches, pooled = [], []
    for bi in range(b):
        for i in range(nh):
            for j in range(nw):
                patches.append(padded[bi, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(p * p, c))
                real = x_BHWC[bi, i * p:min((i + 1) * p, h), j * p:min((j + 1) * p, w)]
                pooled.append(real.reshape(-1, c).mean(0))
    return nh, nw, patches, pooled


def patch_moe_reference(layer, x_BHWC: torch.Tensor, expert_mods):
    """The thesis's Patch-MoE, steps 1-4, with loops: every patch pooled, routed, sent through its experts."""
    cfg = layer.cfg
    p = cfg.patch_size
    b, h, w, c = x_BHWC.shape
    nh, nw, patches, pooled = cut_patches(x_BHWC, p)
    routed = [route_unit(layer.router, u) for u in pooled]
    routes = [r for r, _ in routed]
    cap = None
    if cfg.capacity_factor is not None:
        k = cfg.router.max_k
        cap = max(1, math.ceil(cfg.capacity_factor * len(patches) * k / cfg.router.num_experts))
    keep = capacity_keep(routes, cfg.router.num_experts, cap, cfg.capacity_priority)
    outs = []
    for n, patch in enumerate(patches):
        y = torch.zeros_like(patch)
        for k, (e, wt) in enumerate(routes[n]):
            if (n, k) in keep:
                y = y + wt * expert_mods[e](patch)
        outs.append(y)
    out = torch.zeros(b, nh * p, nw * p, c)
    idx = 0
    rows = []
    for bi in range(b):
        row_blocks = []
        for i in range(nh):
            blocks = [outs[idx + j].reshape(p, p, c) for j in range(nw)]
            idx += nw
            row_blocks.append(torch.cat(blocks, dim=1))
        rows.append(torch.cat(row_blocks, dim=0))
    out = torch.stack(rows)[:, :h, :w]
    probs = torch.stack([pr for _, pr in routed])
    return out, routes, keep, probs


def _hier_expert_id(sizes: list[int], placement: str, g: int, f: int) -> int:
    """Global id of (group g, fine expert f), counted one by one: "grouped" = the experts of the
    groups before g, then f; "spread" = the (f', g') pairs before (f, g) in order of (f', g')."""
    if placement == "grouped":
        return sum(sizes[:g]) + f
    return sum(1 for f2 in range(max(sizes)) for g2 in range(len(sizes)) if f2 < sizes[g2] and (f2, g2) < (f, g))


def hierarchical_reference(layer, x_BHWC: torch.Tensor, expert_mods, modality=None):
    """Two-level routing with loops: each patch picks groups (coarse), then experts inside each
    group (that group's own router); its output is the weight-product sum of those experts."""
    cfg = layer.cfg
    sizes = [cfg.experts_per_group] * cfg.num_groups if isinstance(cfg.experts_per_group, int) \
        else list(cfg.experts_per_group)
    p = cfg.patch_size
    b, h, w, c = x_BHWC.shape
    nh, nw = h // p, w // p
    out = torch.zeros_like(x_BHWC)
    for bi in range(b):
        for i in range(nh):
            for j in range(nw):
                patch = x_BHWC[bi, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(p * p, c)
                u = patch.mean(0)
                if cfg.coarse_mode == "given":
                    groups = [(int(modality[bi]), torch.tensor(1.0))]
                else:
                    groups, _ = route_unit(layer.coarse, u)
                y = torch.zeros_like(patch)
                for g, wg in groups:
                    fines, _ = route_unit(layer.fine[g], u)
                    for f, wf in fines:
                        e = _hier_expert_id(sizes, cfg.placement, g, f)
                        y = y + wg * wf * expert_mods[e](patch)
                out[bi, i * p:(i + 1) * p, j * p:(j + 1) * p] = y.reshape(p, p, c)
    return out

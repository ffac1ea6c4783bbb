"""Loop references for expert-choice routing (router.choice: expert), written as tests/reference.py's
are: every patch and every expert visited in Python, weights taken from the batched layers."""

from __future__ import annotations

import math

import torch

from tests.reference import _hier_expert_id, cut_patches, route_unit


# ---- expert-choice routing: each expert takes its top-C patches of the batch ----------------------
def expert_choice_reference(layer, x_BHWC: torch.Tensor, expert_mods):
    """A PatchMoE with ``router.choice: expert``, with loops: patches (pruned first when the layer
    has a scorer: each image keeps its top ceil(r * patches) by score), each routed patch's probs,
    then for every expert the C patches with the highest probs[:, e] (ties: lower index),
    C = ceil(capacity_factor * N * K / E) (at most N; capacity_factor unset: 1); a patch's output is
    the sum of probs[n, e] * expert_e(patch) over the experts that took it, a patch no expert took
    passes through (``pruned_output``). -> (output [B, H, W, C], taken: list of (expert, patches))."""
    cfg = layer.cfg
    p = cfg.patch_size
    b, h, w, c = x_BHWC.shape
    nh, nw, patches, pooled = cut_patches(x_BHWC, p)
    passed = (lambda t: t) if cfg.pruned_output == "identity" else torch.zeros_like
    per_image = nh * nw
    routed, scale = list(range(len(patches))), {}
    if layer.scorer is not None:
        n_keep = max(1, math.ceil(cfg.keep_fraction * per_image - 1e-9))
        routed = []
        for bi in range(b):
            ids = range(bi * per_image, (bi + 1) * per_image)
            scores = {n: layer.scorer(pooled[n].float()).squeeze() for n in ids}
            best = sorted(ids, key=lambda n: (-float(scores[n].detach()), n))[:n_keep]
            for n in sorted(best):
                s = torch.sigmoid(scores[n])
                scale[n] = 1.0 + s - s.detach()
                routed.append(n)
    probs = {n: route_unit(layer.router, pooled[n])[1] for n in routed}
    e_count, k = cfg.router.num_experts, cfg.router.top_k
    cap = min(len(routed), max(1, math.ceil((cfg.capacity_factor or 1.0) * len(routed) * k / e_count)))
    taken = []
    for e in range(e_count):
        order = sorted(range(len(routed)), key=lambda i: (-float(probs[routed[i]][e].detach()), i))
        taken.append((e, [routed[i] for i in order[:cap]]))
    outs = [passed(patch) for patch in patches]
    got = {n: torch.zeros_like(patches[n]) for n in routed}
    hits = {n: 0 for n in routed}
    for e, units in taken:
        for n in units:
            got[n] = got[n] + probs[n][e] * expert_mods[e](patches[n])
            hits[n] += 1
    for n in routed:
        y = got[n] if hits[n] else passed(patches[n])
        outs[n] = y * scale[n] if n in scale else y
    rows = []
    for bi in range(b):
        blocks = [torch.cat([outs[bi * per_image + i * nw + j].reshape(p, p, c) for j in range(nw)], dim=1)
                  for i in range(nh)]
        rows.append(torch.cat(blocks, dim=0))
    return torch.stack(rows)[:, :h, :w], taken


def hierarchical_expert_choice_reference(layer, x_BHWC: torch.Tensor, expert_mods, modality=None):
    """HierarchicalMoE with ``fine.choice: expert``, with loops: every patch's coarse slots (learned,
    or its image's modality), giving (patch, slot, group, coarse weight) pairs; fine expert (g, f)
    takes the C pairs of group g with the highest p_g(f | patch) (ties: lower pair index),
    C = ceil(capacity_factor * N * Kc * Kf / E) (capacity_factor unset: 1); output = sum over the
    pairs taken of wc * p_g(f | patch) * expert(patch); a patch nobody took passes through.
    -> (output, {global expert id: [patch indices taken]})."""
    cfg = layer.cfg
    sizes = list(cfg.group_sizes)
    p = cfg.patch_size
    b, h, w, c = x_BHWC.shape
    nh, nw = h // p, w // p
    patches = [x_BHWC[bi, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(p * p, c)
               for bi in range(b) for i in range(nh) for j in range(nw)]
    pairs = []  # (patch, group, coarse weight), in patch-major, slot-minor order
    for n, patch in enumerate(patches):
        u = patch.mean(0)
        if cfg.coarse_mode == "given":
            groups = [(int(modality[n // (nh * nw)]), torch.tensor(1.0))]
        else:
            groups, _ = route_unit(layer.coarse, u)
        pairs.extend((n, g, wg) for g, wg in groups)
    kc = 1 if cfg.coarse_mode == "given" else cfg.coarse.top_k
    cap = min(len(pairs), max(1, math.ceil((cfg.capacity_factor or 1.0) * len(patches) * kc * cfg.fine.top_k
                                           / cfg.num_experts)))
    fine_probs = {(n, g): route_unit(layer.fine[g], patches[n].mean(0))[1] for n, g, _ in pairs}
    y = [torch.zeros_like(patch) for patch in patches]
    hits = [0] * len(patches)
    taken = {}
    for g, f_count in enumerate(sizes):
        for f in range(f_count):
            members = [m for m, (_, gm, _) in enumerate(pairs) if gm == g]
            members = sorted(members, key=lambda m: (-float(fine_probs[pairs[m][0], g][f].detach()), m))[:cap]
            e = _hier_expert_id(sizes, cfg.placement, g, f)
            taken[e] = sorted(pairs[m][0] for m in members)
            for m in members:
                n, _, wg = pairs[m]
                y[n] = y[n] + wg * fine_probs[n, g][f] * expert_mods[e](patches[n])
                hits[n] += 1
    out = torch.zeros_like(x_BHWC)
    for n, patch in enumerate(patches):
        bi, rest = divmod(n, nh * nw)
        i, j = divmod(rest, nw)
        out[bi, i * p:(i + 1) * p, j * p:(j + 1) * p] = (y[n] if hits[n] else patch).reshape(p, p, c)
    return out, taken

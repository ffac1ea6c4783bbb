"""Changing a PatchMoE's number of experts between runs: upcycling, pruning, merging.

Works on a layer's state dict (all E experts present, as a single-rank layer or a gathered
checkpoint holds them). Legend: E old experts, E' new, R = E'/E copies, H gate heads.

Upcycle E -> E' = R*E (function-preserving). Expert e becomes copies e*R .. e*R+R-1; copy 0 is
exact, copies 1.. get ``noise`` x std(weight) Gaussian noise. The gate's last layer is repeated
column-wise, so every copy scores like its original (softmax splits p_e into R equal parts of
p_e/R; sigmoid keeps p_e). Top-k must still pick the original experts, not two copies of the
best one, so the aux-loss-free ``selection_bias`` (added to selection scores only, never to the
weights) ranks copy 0 of every expert above every other copy: copy 0 keeps the original order
(bias / R for softmax), copies 1.. sit ``gap`` lower. With normalised top-k weights the upcycled
layer then computes exactly the original function, whatever the noise. Training with
``router.bias_update_rate`` > 0 moves the biases toward equal load and brings the copies in.

Prune E -> E': keep the E' most used experts (usage from a run's expert-load counts).
Merge E -> E': like prune, but every dropped expert is averaged (by usage) into the kept expert
whose gate column is closest (cosine), so its weights are not simply lost.

One group of a HierarchicalMoE (``resize_group_state``): the same upcycle / prune / merge on that
group's fine router and experts, the experts laid out again for the new group sizes.
"""

from __future__ import annotations

import torch

from common.errors import UserError


class ResizeError(UserError, ValueError):
    pass


def _gate_keys(sd: dict, prefix: str) -> tuple[str, str]:
    ws = sorted(int(k.rsplit(".", 1)[1]) for k in sd if k.startswith(prefix + "router.gate.weights."))
    if not ws:
        raise ResizeError(f"no router gate weights under {prefix!r}")
    last = ws[-1]
    return f"{prefix}router.gate.weights.{last}", f"{prefix}router.gate.biases.{last}"


def _expert_keys(sd: dict, prefix: str) -> list[str]:
    return [k for k in sd if k.startswith(prefix + "experts.")]


def upcycle_state(sd: dict, num_experts: int, new_num_experts: int, *, score_fn: str = "softmax",
                  noise: float = 0.0, gap: float | None = None, generator: torch.Generator | None = None,
                  prefix: str = "") -> dict:
    """State dict of a PatchMoE with ``new_num_experts`` = R * ``num_experts`` experts."""
    if new_num_experts % num_experts or new_num_experts < num_experts:
        raise ResizeError(f"upcycling {num_experts} -> {new_num_experts} experts needs a whole multiple of {num_experts}")
    r = new_num_experts // num_experts
    out = dict(sd)
    for k in _expert_keys(sd, prefix):
        w = sd[k]
        if w.shape[0] != num_experts:
            raise ResizeError(f"{k} has {w.shape[0]} experts, expected {num_experts}")
        rep = w.repeat_interleave(r, dim=0).clone()
        if noise > 0 and r > 1:
            std = w.float().std() if w.numel() > 1 else torch.tensor(1.0)
            eps = torch.randn(rep.shape, generator=generator, dtype=torch.float32) * (noise * std)
            copy_mask = (torch.arange(new_num_experts) % r != 0).view(-1, *[1] * (w.dim() - 1))
            rep = rep + (eps * copy_mask).to(rep.dtype)
        out[k] = rep
    wk, bk = _gate_keys(sd, prefix)
    out[wk] = sd[wk].repeat_interleave(r, dim=-1).clone()
    out[bk] = sd[bk].repeat_interleave(r, dim=-1).clone()
    bias_key = prefix + "router.selection_bias"
    b = sd.get(bias_key, torch.zeros(num_experts)).float()
    base = b / r if score_fn == "softmax" else b
    gap = gap if gap is not None else 2.0 + float(base.max() - base.min())
    new_b = base.repeat_interleave(r).clone()
    new_b[torch.arange(new_num_experts) % r != 0] -= gap
    out[bias_key] = new_b.to(sd.get(bias_key, new_b).dtype)
    return out


def _kept_and_map(usage: torch.Tensor, gate_w: torch.Tensor, new_num_experts: int, merge: bool):
    e = usage.numel()
    if not 1 <= new_num_experts <= e:
        raise ResizeError(f"cannot shrink {e} experts to {new_num_experts}")
    order = sorted(range(e), key=lambda i: (-float(usage[i]), i))
    kept = sorted(order[:new_num_experts])
    into = {}
    if merge:
        cols = gate_w.float().reshape(-1, e).T  # [E, H*in]: each expert's gate column
        cols = cols / cols.norm(dim=1, keepdim=True).clamp_min(1e-12)
        for d in order[new_num_experts:]:
            sims = cols[kept] @ cols[d]
            into[d] = kept[int(sims.argmax())]
    return kept, into


def shrink_state(sd: dict, num_experts: int, new_num_experts: int, usage, *, mode: str = "prune",
                 prefix: str = "") -> tuple[dict, list[int]]:
    """Prune or merge down to ``new_num_experts``. Returns (state dict, kept old expert ids)."""
    if mode not in ("prune", "merge"):
        raise ResizeError(f"mode={mode!r} must be 'prune' or 'merge'")
    usage = torch.as_tensor(usage, dtype=torch.float64)
    if usage.numel() != num_experts:
        raise ResizeError(f"usage has {usage.numel()} entries for {num_experts} experts")
    wk, bk = _gate_keys(sd, prefix)
    kept, into = _kept_and_map(usage, sd[wk], new_num_experts, mode == "merge")
    idx = torch.tensor(kept)
    out = dict(sd)
    for k in _expert_keys(sd, prefix):
        w = sd[k]
        if mode == "merge" and into:
            acc = {e: w[e].double() * max(float(usage[e]), 1e-12) for e in kept}
            tot = {e: max(float(usage[e]), 1e-12) for e in kept}
            for d, e in into.items():
                acc[e] = acc[e] + w[d].double() * max(float(usage[d]), 1e-12)
                tot[e] += max(float(usage[d]), 1e-12)
            out[k] = torch.stack([(acc[e] / tot[e]).to(w.dtype) for e in kept])
        else:
            out[k] = w[idx].clone()
    out[wk] = sd[wk][..., idx].clone()
    out[bk] = sd[bk][..., idx].clone()
    bias_key = prefix + "router.selection_bias"
    if bias_key in sd:
        out[bias_key] = sd[bias_key][idx].clone()
    return out, kept


def resize_group_state(sd: dict, group_sizes: tuple[int, ...], placement: str, group: int, new_size: int, *,
                       mode: str = "upcycle", usage=None, score_fn: str = "softmax", noise: float = 0.0,
                       gap: float | None = None, generator: torch.Generator | None = None) -> tuple[dict, tuple[int, ...]]:
    """Grow or shrink group ``group`` of a HierarchicalMoE's state dict (all E experts present:
    "coarse....", "fine.<g>....", "experts.<name>" stacked [E, ...]) to ``new_size`` fine experts.

    The group's fine router and experts go through :func:`upcycle_state` / :func:`shrink_state`
    as a PatchMoE of F_g experts would (``usage``: the layer's load per global expert, for
    prune/merge); the experts are then laid out again by ``placement`` for the new sizes
    (moe/hierarchical.py: ``expert_id_table``). The coarse router, the other groups' routers and
    their experts' weights are unchanged (only their global ids move). Returns (state dict, new sizes).
    """
    from moe.hierarchical import expert_id_table

    sizes = tuple(group_sizes)
    if not 0 <= group < len(sizes):
        raise ResizeError(f"group={group} is not one of the layer's groups 0..{len(sizes) - 1}")
    if mode not in ("upcycle", "prune", "merge"):
        raise ResizeError(f"mode={mode!r} must be 'upcycle', 'prune' or 'merge'")
    old_ids = expert_id_table(sizes, placement)
    names = _expert_keys(sd, "")
    for k in names:
        if sd[k].shape[0] != sum(sizes):
            raise ResizeError(f"{k} has {sd[k].shape[0]} experts, but experts_per_group={list(sizes)} makes {sum(sizes)}")
    head = f"fine.{group}."
    view = {"router." + k[len(head):]: v for k, v in sd.items() if k.startswith(head)}  # as a PatchMoE's
    if not view:
        raise ResizeError(f"no fine router {head!r} in the state dict: not a HierarchicalMoE layer")
    mine = torch.tensor(old_ids[group])
    view.update({k: sd[k][mine] for k in names})
    f_old = sizes[group]
    if mode == "upcycle":
        new_view = upcycle_state(view, f_old, new_size, score_fn=score_fn, noise=noise, gap=gap, generator=generator)
    else:
        if usage is None:
            raise ResizeError(f"mode={mode!r} needs the layer's expert usage")
        usage = torch.as_tensor(usage, dtype=torch.float64)
        if usage.numel() != sum(sizes):
            raise ResizeError(f"usage has {usage.numel()} entries for the layer's {sum(sizes)} experts")
        new_view = shrink_state(view, f_old, new_size, usage[mine], mode=mode)[0]
    new_sizes = sizes[:group] + (new_size,) + sizes[group + 1:]
    new_ids = expert_id_table(new_sizes, placement)
    out = {k: v for k, v in sd.items() if not k.startswith(head)}
    out.update({head + k[len("router."):]: v for k, v in new_view.items() if k.startswith("router.")})
    for k in names:
        rows: list = [None] * sum(new_sizes)
        for g, ids in enumerate(new_ids):
            for f, e in enumerate(ids):
                rows[e] = new_view[k][f] if g == group else sd[k][old_ids[g][f]]
        out[k] = torch.stack(rows).clone()
    return out, new_sizes

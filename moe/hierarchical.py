"""Hierarchical MoE: coarse expert groups per modality, fine experts per scale inside each group.

Legend
  B batch, N patches, L = P*P points, C channels, G coarse groups (RGB / NIR / TIR),
  F_g fine experts in group g (4x4 / 8x8 / 16x16 scales; groups may differ, e.g. 8, 4, 4),
  Fm = max F_g, E = sum F_g experts, Kc coarse slots, Kf fine slots, K = Kc*Kf slots per patch.

Per patch (one decision per P x P patch, as PatchMoE):
  coarse:  learned - Router over G groups on the pooled patch -> groups g_j, weights wc_j [N, Kc]
           given   - the caller names each image's modality -> one group, weight 1
  fine:    group g's own Router over its F_g experts -> experts f_i, weights wf_i     [N, Kf]
  expert (g, f), weight wc_j * wf_i, for every coarse slot j and fine slot i          [N, K]
  y = sum over slots of weight * expert_(g,f)(patch)
Every expert is one of E global experts, so the same dispatcher (local, or all-to-all over an EP
group) shards both levels. ``placement`` orders the global ids (:func:`expert_id_table`):
  "grouped": id = offset_g + f (offset_g = F_0 + ... + F_{g-1}; g*F + f for equal groups) - a
             group's experts are contiguous, so with EP they live on one rank (or one consecutive
             set of ranks: one node), and fine-level traffic for a group goes to that node only;
  "spread":  the (f, g) pairs numbered in order of (f, g) (f*G + g for equal groups) - a group's
             experts are interleaved over the ranks.
The balance loss sees the joint distribution p(g) * p(f | g) over the E experts.

Fine-level expert choice (``fine.choice: expert``): the coarse level routes as above, giving
M = N * Kc (patch, coarse slot) pairs; fine expert (g, f) takes the C pairs of group g with the
highest p_g(f | patch), C = ceil(capacity_factor * N * Kc * Kf / E), with weight wc * p_g(f | patch).
A group with fewer than C pairs leaves the rest of its experts' slots empty (padding rows of
weight 0: the exchange keeps its [E, C] shape); a patch no fine expert took passes through.

Transport: the layer's dispatcher is a :class:`HierarchicalDispatcher`: it takes the patches and
both levels' decisions to the experts (``dispatch``) and brings back every patch's weighted sum
(``combine``). :class:`OneStage` sends every (group, fine) slot straight to its expert's rank
through any plain dispatcher (local, or all-to-all over an EP group); the two-stage node transport
(parallel/node_transport.py) moves a patch once per coarse slot to the node of its group and does
the fine-level exchange inside that node. The forward pass is the same either way:
  route -> dispatcher.dispatch -> experts -> dispatcher.combine
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn

from common.timing import StageTimer
from moe.balance import MoEOutput, coverage_shares, routing_stats
from moe.config import HierarchicalMoEConfig
from moe.dispatch import Dispatcher, LocalDispatcher, plan_dispatch, slot_counts, unpermute
from moe.experts import build_experts
from moe.router import Router, RoutingDecision, expert_capacity
from moe.timing import NullTimer
from moe.units import make_grid, patchify, pool_units, unpatchify


@dataclass(frozen=True)
class HierRoute:
    """Both levels' decisions. ``decision`` is the flattened per-expert view [N, K] (or the fine
    experts' choice [E, C])."""

    decision: RoutingDecision
    group_NKc: torch.Tensor  # coarse groups
    coarse_w_NKc: torch.Tensor
    expert_NKcKf: torch.Tensor | None  # global expert ids (None: fine-level expert choice, see ``decision``)
    fine_w_NKcKf: torch.Tensor | None
    fine_mask_NKcKf: torch.Tensor | None


class HierarchicalDispatcher(Protocol):
    """Moves patches to the experts of both levels' decisions and back. ``moe/`` sees ranks only here."""

    num_local_experts: int
    placement: str | None  # the expert order it needs ("grouped"), or None for any

    def dispatch(self, units_NLC: torch.Tensor, route: HierRoute) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """-> (rows for the local experts [U, L, C] sorted by local expert, counts [E_local], meta).

        ``meta`` is frozen: everything ``combine`` needs, and ``meta.host_counts`` (the local
        counts as a host list when the dispatcher read them, else None)."""

    def combine(self, expert_out_ULC: torch.Tensor, meta: Any) -> torch.Tensor:
        """Expert outputs back to their patches, weighted and summed per patch: [N, L, C]."""


@dataclass(frozen=True)
class OneStageMeta:
    inner: Any  # the plain dispatcher's metadata (its plan resolved)
    weights_NK: torch.Tensor  # the flattened routing weights

    @property
    def host_counts(self) -> list | None:
        return self.inner.host_counts


class OneStage:
    """Every (group, fine expert) slot goes straight to its expert's rank through a plain dispatcher."""

    placement = None  # any expert order

    def __init__(self, dispatcher: Dispatcher, num_experts: int):
        self.dispatcher = dispatcher
        self.num_experts = num_experts

    @property
    def num_local_experts(self) -> int:
        return self.dispatcher.num_local_experts

    @property
    def first_expert(self) -> int:
        return self.dispatcher.first_expert

    def dispatch(self, units_NLC: torch.Tensor, route: HierRoute) -> tuple[torch.Tensor, torch.Tensor, OneStageMeta]:
        plan = plan_dispatch(route.decision, self.num_experts, None)
        rows_ULC, local_counts, meta = self.dispatcher.dispatch(units_NLC, plan)
        return rows_ULC, local_counts, OneStageMeta(meta, route.decision.weights)

    def combine(self, expert_out_ULC: torch.Tensor, meta: OneStageMeta) -> torch.Tensor:
        back_RLC = self.dispatcher.combine(expert_out_ULC, meta.inner)
        return unpermute(back_RLC, meta.inner.plan, meta.weights_NK)


def expert_id_table(group_sizes: tuple[int, ...], placement: str) -> list[list[int]]:
    """Global expert id of every (group g, fine expert f < F_g), per group (see the module docstring)."""
    if placement == "grouped":
        offsets = [sum(group_sizes[:g]) for g in range(len(group_sizes))]
        return [[offsets[g] + f for f in range(n)] for g, n in enumerate(group_sizes)]
    pairs = [(f, g) for f in range(max(group_sizes)) for g, n in enumerate(group_sizes) if f < n]
    ids = {pair: i for i, pair in enumerate(pairs)}
    return [[ids[(f, g)] for f in range(n)] for g, n in enumerate(group_sizes)]


class HierarchicalMoE(nn.Module):
    """``dispatcher`` decides where experts live and how patches reach them; the default keeps all
    of them on this rank (:class:`OneStage` over a local dispatcher). ``timer`` measures the
    stages route / dispatch / experts / combine."""

    def __init__(self, cfg: HierarchicalMoEConfig, dispatcher: HierarchicalDispatcher | None = None,
                 timer: StageTimer | None = None, expert_seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        e = cfg.num_experts
        self.dispatcher = dispatcher if dispatcher is not None else OneStage(LocalDispatcher(e), e)
        self.timer = timer if timer is not None else NullTimer()
        if self.dispatcher.placement not in (None, cfg.placement):
            raise ValueError(f"{type(self.dispatcher).__name__} needs placement={self.dispatcher.placement!r} "
                             f"(got {cfg.placement!r})")
        if e % self.dispatcher.num_local_experts:
            raise ValueError(f"num_experts={e} is not a multiple of the dispatcher's "
                             f"num_local_experts={self.dispatcher.num_local_experts}")
        self.coarse = Router(cfg.coarse, cfg.dim) if cfg.coarse_mode == "learned" else None
        self.fine = nn.ModuleList(Router(cfg.fine_router(g), cfg.dim) for g in range(cfg.num_groups))
        self.experts = build_experts(cfg.expert, self.dispatcher.num_local_experts, cfg.dim,
                                    first=self.dispatcher.first_expert, seed=expert_seed)
        table = expert_id_table(cfg.group_sizes, cfg.placement)
        fm = max(cfg.group_sizes)
        ids = torch.tensor([row + [0] * (fm - len(row)) for row in table])  # padding never picked by a router
        valid = torch.tensor([f < len(row) for row in table for f in range(fm)])
        self.register_buffer("expert_id", ids, persistent=False)  # [G, Fm] global id of (group, fine)
        self.register_buffer("valid_GFm", valid.nonzero().flatten(), persistent=False)  # real (g, f) in G*Fm
        self.register_buffer("valid_id", ids.flatten()[valid], persistent=False)  # their global ids [E]
        group_of, fine_of = torch.zeros(e, dtype=torch.long), torch.zeros(e, dtype=torch.long)
        for g, row in enumerate(table):
            for f, gid in enumerate(row):
                group_of[gid], fine_of[gid] = g, f
        self.register_buffer("group_of_id", group_of, persistent=False)  # [E] group of each global expert
        self.register_buffer("fine_of_id", fine_of, persistent=False)  # [E] its index inside the group

    def route(self, pooled_NC: torch.Tensor, group_of_unit: torch.Tensor | None) -> HierRoute:
        cfg = self.cfg
        n, g_count, fm = pooled_NC.shape[0], cfg.num_groups, self.expert_id.shape[1]
        if self.coarse is not None:
            coarse = self.coarse(pooled_NC)
            cg_NKc, cw_NKc, cmask = coarse.expert_ids, coarse.weights, coarse.slot_mask
            pc_NG, logits = coarse.probs, coarse.logits
        else:
            if group_of_unit is None:
                raise ValueError("coarse_mode='given' needs the modality (group id) of every image")
            cg_NKc = group_of_unit.view(n, 1)
            cw_NKc = torch.ones(n, 1, device=pooled_NC.device)
            cmask = torch.ones(n, 1, dtype=torch.bool, device=pooled_NC.device)
            pc_NG = nn.functional.one_hot(cg_NKc[:, 0], g_count).float()
            logits = None
        if cfg.fine.choice == "expert":
            return self._fine_expert_choice(pooled_NC, cg_NKc, cw_NKc * cmask, cmask, pc_NG, logits)
        fine = [r(pooled_NC) for r in self.fine]  # every group's fine decision (small: C -> F each)
        f_ids = torch.stack([d.expert_ids for d in fine], 1)  # [N, G, Kf]
        f_w = torch.stack([d.weights for d in fine], 1)
        f_mask = torch.stack([d.slot_mask for d in fine], 1)
        f_probs = torch.stack([nn.functional.pad(d.probs, (0, fm - d.probs.shape[1])) for d in fine], 1)  # [N, G, Fm]
        idx = cg_NKc.unsqueeze(-1).expand(-1, -1, f_ids.shape[-1])  # [N, Kc, Kf]
        sel_ids = f_ids.gather(1, idx)
        sel_w = f_w.gather(1, idx)
        sel_mask = f_mask.gather(1, idx)
        ids_NK = self.expert_id[cg_NKc.unsqueeze(-1), sel_ids].flatten(1)
        w_NK = (cw_NKc.unsqueeze(-1) * sel_w).flatten(1)
        mask_NK = (cmask.unsqueeze(-1) & sel_mask).flatten(1)
        probs_NE = self._joint_probs(pc_NG, f_probs)
        all_live = (self.coarse is None or cfg.coarse.dynamic_top_p is None) and cfg.fine.dynamic_top_p is None
        decision = RoutingDecision(ids_NK, w_NK * mask_NK, mask_NK, probs_NE, logits, all_live=all_live)
        expert_NKcKf = self.expert_id[cg_NKc.unsqueeze(-1), sel_ids]
        return HierRoute(decision, cg_NKc, cw_NKc * cmask, expert_NKcKf, sel_w * sel_mask, sel_mask)

    def _joint_probs(self, pc_NG: torch.Tensor, f_probs_NGFm: torch.Tensor) -> torch.Tensor:
        """[N, E] p(g) * p(f | g) at each expert's global id (what the balance loss sees)."""
        joint_NE = (pc_NG.unsqueeze(-1) * f_probs_NGFm).flatten(1)
        if joint_NE.shape[1] != self.cfg.num_experts:  # unequal groups: drop the padding
            joint_NE = joint_NE.index_select(1, self.valid_GFm)
        probs_NE = torch.zeros(joint_NE.shape[0], self.cfg.num_experts, device=joint_NE.device, dtype=joint_NE.dtype)
        return probs_NE.index_copy(1, self.valid_id, joint_NE)

    def _fine_expert_choice(self, pooled_NC, cg_NKc, cw_NKc, cmask_NKc, pc_NG, logits) -> HierRoute:
        """Fine expert (g, f) takes its group's C best (patch, coarse slot) pairs (module docstring)."""
        cfg = self.cfg
        n, kc = cg_NKc.shape
        fm = self.expert_id.shape[1]
        scored = [r.score(pooled_NC)[0] for r in self.fine]
        f_probs = torch.stack([nn.functional.pad(p, (0, fm - p.shape[1])) for p in scored], 1)  # [N, G, Fm]
        pair_unit_M = torch.arange(n, device=pooled_NC.device).repeat_interleave(kc)
        pair_group_M = cg_NKc.reshape(-1)
        pair_probs_MFm = f_probs[pair_unit_M, pair_group_M]  # [M, Fm] p_g(f | patch) of the pair's group
        score_EM = pair_probs_MFm.index_select(1, self.fine_of_id).t()  # [E, M]
        member_EM = (pair_group_M[None, :] == self.group_of_id[:, None]) & cmask_NKc.reshape(1, -1)
        ranked = torch.where(member_EM, score_EM.detach(), torch.full_like(score_EM, -1.0))  # probs >= 0
        c = min(expert_capacity(n, kc * cfg.fine.top_k, cfg.num_experts, cfg.capacity_factor or 1.0), n * kc)
        pair_EC = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[:, :c]
        live_EC = member_EM.gather(1, pair_EC)
        w_EC = cw_NKc.reshape(-1)[pair_EC] * score_EM.gather(1, pair_EC) * live_EC
        ids_EC = torch.arange(cfg.num_experts, device=pooled_NC.device)[:, None].expand_as(pair_EC)
        decision = RoutingDecision(ids_EC, w_EC, live_EC, self._joint_probs(pc_NG, f_probs), logits,
                                   all_live=True, unit_ids=pair_unit_M[pair_EC])
        return HierRoute(decision, cg_NKc, cw_NKc, None, None, None)

    def forward(self, x_BHWC: torch.Tensor, modality_B: torch.Tensor | None = None) -> MoEOutput:
        cfg = self.cfg
        if x_BHWC.shape[-1] != cfg.dim:
            raise ValueError(f"HierarchicalMoE(dim={cfg.dim}) got a map with C={x_BHWC.shape[-1]} channels")
        grid = make_grid(x_BHWC, cfg.patch_size, cfg.pad_mode)
        with self.timer.stage("route"):
            units_NLC = patchify(x_BHWC, grid)
            group_of_unit = None
            if modality_B is not None:
                group_of_unit = modality_B.to(units_NLC.device).long().repeat_interleave(grid.n_h * grid.n_w)
            route = self.route(pool_units(units_NLC, grid), group_of_unit)
        with self.timer.stage("dispatch"):
            rows_ULC, local_counts, meta = self.dispatcher.dispatch(units_NLC, route)
        with self.timer.stage("experts"):
            out_ULC = self.experts(rows_ULC, local_counts, meta.host_counts)
        with self.timer.stage("combine"):
            y_NLC = self.dispatcher.combine(out_ULC, meta)
            decision = route.decision
            if decision.expert_choice:  # a patch no fine expert took passes through
                y_NLC = torch.where((decision.taken_counts() > 0)[:, None, None], y_NLC, units_NLC)
        y = unpatchify(y_NLC, grid)

        if decision.expert_choice:
            load_E = decision.slot_mask.sum(1).float()  # live picks per expert (padding rows excluded)
        else:
            load_E = slot_counts(decision.expert_ids, decision.slot_mask, cfg.num_experts).float()  # dropless
        stats = routing_stats(
            probs_NE=decision.probs, logits_HNE=decision.logits, load_E=load_E, kept_E=load_E,
            active_slots=decision.slot_mask.sum(), num_units=grid.num_units, coefs=cfg.balance,
            coverage=coverage_shares(decision.taken_counts()) if decision.expert_choice else None,
        )
        return MoEOutput(y, stats, decision.weights)

"""Hierarchical MoE: coarse expert groups per modality, fine experts per scale inside each group.

Legend
  B batch, N patches, L = P*P points, C channels, G coarse groups (RGB / NIR / TIR),
  F fine experts per group (4x4 / 8x8 / 16x16 scales), E = G*F experts, Kc coarse slots,
  Kf fine slots, K = Kc*Kf slots per patch.

Per patch (one decision per P x P patch, as PatchMoE):
  coarse:  learned - Router over G groups on the pooled patch -> groups g_j, weights wc_j [N, Kc]
           given   - the caller names each image's modality -> one group, weight 1
  fine:    group g's own Router over its F experts -> experts f_i, weights wf_i       [N, Kf]
  expert (g, f), weight wc_j * wf_i, for every coarse slot j and fine slot i          [N, K]
  y = sum over slots of weight * expert_(g,f)(patch)
Every expert is one of E global experts, so the same dispatcher (local, or all-to-all over an EP
group) shards both levels. ``placement`` orders the global ids:
  "grouped": id = g*F + f  - a group's F experts are contiguous, so with EP they live on one
             rank (or one consecutive set of ranks: one node), and fine-level traffic for a group
             goes to that node only;
  "spread":  id = f*G + g  - a group's experts are spread round-robin over the ranks.
The balance loss sees the joint distribution p(g) * p(f | g) over the E experts.

Transport: a dispatcher (one stage: every (group, fine) slot goes straight to its expert's
rank), or a two-stage ``transport`` object (parallel/node_transport.py) that moves a patch once
per coarse slot to the node of its group and does the fine-level exchange inside that node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from moe.balance import MoEOutput, routing_stats
from moe.config import HierarchicalMoEConfig
from moe.dispatch import Dispatcher, LocalDispatcher, plan_dispatch, slot_counts, unpermute
from moe.experts import build_experts
from moe.router import Router, RoutingDecision
from moe.timing import NullTimer, StageTimer
from moe.units import make_grid, patchify, pool_units, unpatchify


@dataclass(frozen=True)
class HierRoute:
    """Both levels' decisions. ``decision`` is the flattened per-expert view [N, K]."""

    decision: RoutingDecision
    group_NKc: torch.Tensor  # coarse groups
    coarse_w_NKc: torch.Tensor
    expert_NKcKf: torch.Tensor  # global expert ids
    fine_w_NKcKf: torch.Tensor
    fine_mask_NKcKf: torch.Tensor


class HierarchicalMoE(nn.Module):
    def __init__(self, cfg: HierarchicalMoEConfig, dispatcher: Dispatcher | None = None,
                 timer: StageTimer | None = None, transport: Any = None):
        super().__init__()
        self.cfg = cfg
        e = cfg.num_experts
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(e)
        self.transport = transport
        self.timer = timer if timer is not None else NullTimer()
        if transport is not None:
            if cfg.placement != "grouped":
                raise ValueError("a two-stage node transport needs placement='grouped'")
            self.dispatcher = transport
        if e % self.dispatcher.num_local_experts:
            raise ValueError(f"num_experts={e} is not a multiple of the dispatcher's "
                             f"num_local_experts={self.dispatcher.num_local_experts}")
        self.coarse = Router(cfg.coarse, cfg.dim) if cfg.coarse_mode == "learned" else None
        self.fine = nn.ModuleList(Router(cfg.fine, cfg.dim) for _ in range(cfg.num_groups))
        self.experts = build_experts(cfg.expert, self.dispatcher.num_local_experts, cfg.dim)
        g, f = cfg.num_groups, cfg.experts_per_group
        gg, ff = torch.meshgrid(torch.arange(g), torch.arange(f), indexing="ij")
        ids = gg * f + ff if cfg.placement == "grouped" else ff * g + gg
        self.register_buffer("expert_id", ids, persistent=False)  # [G, F] global id of (group, fine)

    def route(self, pooled_NC: torch.Tensor, group_of_unit: torch.Tensor | None) -> HierRoute:
        cfg = self.cfg
        n, g_count, f_count = pooled_NC.shape[0], cfg.num_groups, cfg.experts_per_group
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
        fine = [r(pooled_NC) for r in self.fine]  # every group's fine decision (small: C -> F each)
        f_ids = torch.stack([d.expert_ids for d in fine], 1)  # [N, G, Kf]
        f_w = torch.stack([d.weights for d in fine], 1)
        f_mask = torch.stack([d.slot_mask for d in fine], 1)
        f_probs = torch.stack([d.probs for d in fine], 1)  # [N, G, F]
        idx = cg_NKc.unsqueeze(-1).expand(-1, -1, f_ids.shape[-1])  # [N, Kc, Kf]
        sel_ids = f_ids.gather(1, idx)
        sel_w = f_w.gather(1, idx)
        sel_mask = f_mask.gather(1, idx)
        ids_NK = self.expert_id[cg_NKc.unsqueeze(-1), sel_ids].flatten(1)
        w_NK = (cw_NKc.unsqueeze(-1) * sel_w).flatten(1)
        mask_NK = (cmask.unsqueeze(-1) & sel_mask).flatten(1)
        joint_NGF = pc_NG.unsqueeze(-1) * f_probs
        probs_NE = torch.zeros(n, g_count * f_count, device=pooled_NC.device, dtype=joint_NGF.dtype)
        probs_NE = probs_NE.index_copy(1, self.expert_id.flatten(), joint_NGF.flatten(1))
        all_live = (self.coarse is None or cfg.coarse.dynamic_top_p is None) and cfg.fine.dynamic_top_p is None
        decision = RoutingDecision(ids_NK, w_NK * mask_NK, mask_NK, probs_NE, logits, all_live=all_live)
        expert_NKcKf = self.expert_id[cg_NKc.unsqueeze(-1), sel_ids]
        return HierRoute(decision, cg_NKc, cw_NKc * cmask, expert_NKcKf, sel_w * sel_mask, sel_mask)

    def forward(self, x_BHWC: torch.Tensor, modality_B: torch.Tensor | None = None) -> MoEOutput:
        cfg = self.cfg
        if x_BHWC.shape[-1] != cfg.dim:
            raise ValueError(f"HierarchicalMoE(dim={cfg.dim}) got a map with C={x_BHWC.shape[-1]} channels")
        grid = make_grid(x_BHWC, cfg.patch_size, cfg.pad_mode)
        e = cfg.num_experts
        with self.timer.stage("route"):
            units_NLC = patchify(x_BHWC, grid)
            group_of_unit = None
            if modality_B is not None:
                group_of_unit = modality_B.to(units_NLC.device).long().repeat_interleave(grid.n_h * grid.n_w)
            route = self.route(pool_units(units_NLC, grid), group_of_unit)
            decision = route.decision
        if self.transport is not None:
            y_NLC = self._two_stage(units_NLC, route)
            load_E = slot_counts(decision.expert_ids, decision.slot_mask, e).float()
            kept_E = load_E
        else:
            with self.timer.stage("route"):
                plan = plan_dispatch(decision, e, None)
            with self.timer.stage("dispatch"):
                rows_ULC, local_counts, meta = self.dispatcher.dispatch(units_NLC, plan)
                plan = meta.plan  # row count resolved
            with self.timer.stage("experts"):
                out_ULC = self.experts(rows_ULC, local_counts, meta.host_counts)
            with self.timer.stage("combine"):
                back_RLC = self.dispatcher.combine(out_ULC, meta)
                y_NLC = unpermute(back_RLC, plan, decision.weights)
            load_E, kept_E = plan.routed.float(), plan.counts
        y = unpatchify(y_NLC, grid)
        logits = decision.logits if decision.logits is not None else None
        stats = routing_stats(
            probs_NE=decision.probs, logits_HNE=logits, load_E=load_E, kept_E=kept_E,
            active_slots=decision.slot_mask.sum(), num_units=grid.num_units, coefs=cfg.balance,
        )
        return MoEOutput(y, stats, decision.weights)

    def _two_stage(self, units_NLC: torch.Tensor, route: HierRoute) -> torch.Tensor:
        """Coarse all-to-all to the group's node, fine all-to-all inside it, and back."""
        t = self.transport
        n, kc = route.group_NKc.shape
        with self.timer.stage("dispatch"):
            rows1, ids1, w1, mask1, meta1 = t.to_groups(units_NLC, route.group_NKc, route.expert_NKcKf,
                                                        route.fine_w_NKcKf, route.fine_mask_NKcKf)
            fine = RoutingDecision(ids1, w1 * mask1, mask1, None, None)
            plan2 = plan_dispatch(fine, t.num_node_experts, None)
            rows2, counts2, meta2 = t.fine.dispatch(rows1, plan2)
            plan2 = meta2.plan
        with self.timer.stage("experts"):
            out2 = self.experts(rows2, counts2, meta2.host_counts)
        with self.timer.stage("combine"):
            z = unpermute(t.fine.combine(out2, meta2), plan2, fine.weights)
            back = t.from_groups(z, meta1).view(n, kc, *units_NLC.shape[1:])
            return (back * route.coarse_w_NKc.to(back.dtype)[..., None, None]).sum(1)

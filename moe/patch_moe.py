"""Seed 003's Patch-MoE: route each P x P patch of a feature map to its top-k experts.

Legend
  B batch, H/W map size, C channels, P patch side, N = B*ceil(H/P)*ceil(W/P) patches,
  L = P*P points per patch, K slots per patch, E experts.

Flow (seed 003, steps 1-4):
  [B, H, W, C] --unfold--> units [N, L, C] --mean-pool--> [N, C] --router--> ids/weights [N, K]
  --plan + dispatcher--> expert rows [U, L, C] --experts--> [U, L, C] --dispatcher back-->
  rows [R, L, C] --weighted sum per patch--> [N, L, C] --fold--> [B, H, W, C]
All L points of a patch travel together and share its experts and weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moe.balance import MoEOutput, routing_stats
from moe.config import PatchMoEConfig
from moe.dispatch import Dispatcher, LocalDispatcher, plan_dispatch, unpermute
from moe.experts import build_experts
from moe.router import Router
from moe.timing import NullTimer, StageTimer
from moe.units import make_grid, patchify, pool_units, unpatchify


class PatchMoE(nn.Module):
    """Patch-routed MoE over a [B, H, W, C] feature map (token routing when patch_size=1).

    ``dispatcher`` decides where experts live; the default keeps all of them on this rank.
    ``timer`` measures the stages route / dispatch / experts / combine (nothing by default).
    Both are fixed at construction: the layer never looks up process groups itself.
    """

    def __init__(self, cfg: PatchMoEConfig, dispatcher: Dispatcher | None = None, timer: StageTimer | None = None):
        super().__init__()
        e = cfg.router.num_experts
        self.cfg = cfg
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(e)
        self.timer = timer if timer is not None else NullTimer()
        if e % self.dispatcher.num_local_experts:
            raise ValueError(
                f"num_experts={e} is not a multiple of the dispatcher's "
                f"num_local_experts={self.dispatcher.num_local_experts}"
            )
        self.router = Router(cfg.router, cfg.dim)
        self.experts = build_experts(cfg.expert, self.dispatcher.num_local_experts, cfg.dim)
        self.register_buffer("pending_load", torch.zeros(e), persistent=False)

    def forward(self, x_BHWC: torch.Tensor) -> MoEOutput:
        cfg = self.cfg
        grid = make_grid(x_BHWC, cfg.patch_size, cfg.pad_mode)
        if x_BHWC.shape[-1] != cfg.dim:
            raise ValueError(f"PatchMoE(dim={cfg.dim}) got a map with C={x_BHWC.shape[-1]} channels")
        e, k = cfg.router.num_experts, cfg.router.max_k
        with self.timer.stage("route"):
            units_NLC = patchify(x_BHWC, grid)
            decision = self.router(pool_units(units_NLC, grid))
            capacity = None
            if cfg.capacity_factor is not None:
                capacity = self.dispatcher.capacity(grid.num_units, k, e, cfg.capacity_factor)
            plan = plan_dispatch(decision, e, capacity, cfg.capacity_priority)
        with self.timer.stage("dispatch"):
            rows_ULC, local_counts, meta = self.dispatcher.dispatch(units_NLC, plan)
        with self.timer.stage("experts"):
            out_ULC = self.experts(rows_ULC, local_counts)
        with self.timer.stage("combine"):
            back_RLC = self.dispatcher.combine(out_ULC, meta)
            y_NLC = unpatchify(unpermute(back_RLC, plan, decision.weights), grid)

        load_E = plan.routed.float()
        if self.training and cfg.router.bias_update_rate > 0:
            self.pending_load += load_E.detach()
        stats = routing_stats(
            probs_NE=decision.probs, logits_HNE=decision.logits, load_E=load_E,
            kept_E=plan.counts, active_slots=decision.slot_mask.sum(),
            num_units=grid.num_units, coefs=cfg.balance,
        )
        return MoEOutput(y_NLC, stats, decision.weights)

    @torch.no_grad()
    def apply_bias_update(self, reduce_load=None) -> None:
        """Aux-loss-free balancing: move the router bias by the load seen since the last call.

        ``reduce_load`` (optional) sums the load over the data-parallel group in place.
        Call after each optimizer step.
        """
        load = self.pending_load.clone()
        if reduce_load is not None:
            reduce_load(load)
        self.router.update_bias(load)
        self.pending_load.zero_()

"""Seed 003's Patch-MoE: route each P x P patch of a feature map to its top-k experts.

Legend
  B batch, H/W map size, C channels, P patch side, N = B*ceil(H/P)*ceil(W/P) patches,
  L = P*P points per patch, K slots per patch, E experts.

Flow (seed 003, steps 1-4):
  [B, H, W, C] --unfold--> units [N, L, C] --mean-pool--> [N, C] --router--> ids/weights [N, K]
  --plan + dispatcher--> expert rows [U, L, C] --experts--> [U, L, C] --dispatcher back-->
  rows [R, L, C] --weighted sum per patch--> [N, L, C] --fold--> [B, H, W, C]
All L points of a patch travel together and share its experts and weights.

Dual sparsity (seed 003, ``keep_fraction`` < 1): before routing, a light scorer (one Linear on
the pooled patch) keeps the top ceil(r * patches per image) patches of each image; only they
are routed, dispatched and computed. Pruned patches pass through (identity, or zero inside a
residual branch). The kept outputs are multiplied by 1 + s - stop_grad(s), s = sigmoid(score):
exactly 1 in the forward pass (kept outputs equal the unpruned layer's), while the scorer
receives a gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from moe.balance import MoEOutput, routing_stats
from moe.combine import slot_sum_to_map
from moe.config import PatchMoEConfig
from moe.dispatch import Dispatcher, LocalDispatcher, plan_dispatch, unpermute
from moe.experts import build_experts
from moe.indexing import gather_rows
from moe.router import Router
from moe.timing import NullTimer, StageTimer
from moe.units import PatchView, make_grid, patchify, pool_units, unpatchify


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
        self.scorer = nn.Linear(cfg.dim, 1) if cfg.keep_fraction < 1 else None

    def forward(self, x_BHWC: torch.Tensor) -> MoEOutput:
        cfg = self.cfg
        grid = make_grid(x_BHWC, cfg.patch_size, cfg.pad_mode)
        if x_BHWC.shape[-1] != cfg.dim:
            raise ValueError(f"PatchMoE(dim={cfg.dim}) got a map with C={x_BHWC.shape[-1]} channels")
        e, k = cfg.router.num_experts, cfg.router.max_k
        in_place = self.scorer is None and not grid.padded  # read patches from the map, write back into it
        with self.timer.stage("route"):
            if in_place:
                view = PatchView.of(x_BHWC, grid)
                units_NLC, pooled_NC = view, view.pooled()
            else:
                units_NLC = patchify(x_BHWC, grid)
                pooled_NC = pool_units(units_NLC, grid)
            keep_idx, keep_scale = self._prune(pooled_NC, grid)
            if keep_idx is not None:
                routed_NLC, pooled_NC = gather_rows(units_NLC, keep_idx), gather_rows(pooled_NC, keep_idx)
            else:
                routed_NLC = units_NLC
            n_routed = pooled_NC.shape[0]
            decision = self.router(pooled_NC)
            capacity = None
            if cfg.capacity_factor is not None:
                capacity = self.dispatcher.capacity(n_routed, k, e, cfg.capacity_factor)
            plan = plan_dispatch(decision, e, capacity, cfg.capacity_priority)
        with self.timer.stage("dispatch"):
            rows_ULC, local_counts, meta = self.dispatcher.dispatch(routed_NLC, plan)
            plan = meta.plan  # row count resolved
        with self.timer.stage("experts"):
            out_ULC = self.experts(rows_ULC, local_counts, meta.host_counts)
        with self.timer.stage("combine"):
            back_RLC = self.dispatcher.combine(out_ULC, meta)
            if in_place and back_RLC.shape[0] == n_routed * k:
                y_NLC = slot_sum_to_map(back_RLC, decision.weights, plan.slot_of_row, grid)
            else:
                y_NLC = unpermute(back_RLC, plan, decision.weights)
                if keep_idx is not None:
                    base = units_NLC if cfg.pruned_output == "identity" else torch.zeros_like(units_NLC)
                    y_NLC = base.index_copy(0, keep_idx, y_NLC * keep_scale.to(y_NLC.dtype)[:, None, None])
                y_NLC = unpatchify(y_NLC, grid)

        load_E = plan.routed.float()
        if self.training and cfg.router.bias_update_rate > 0:
            self.pending_load += load_E.detach()
        stats = routing_stats(
            probs_NE=decision.probs, logits_HNE=decision.logits, load_E=load_E,
            kept_E=plan.counts, active_slots=decision.slot_mask.sum(),
            num_units=n_routed, coefs=cfg.balance, pruned_units=grid.num_units - n_routed,
        )
        return MoEOutput(y_NLC, stats, decision.weights)

    def _prune(self, pooled_NC: torch.Tensor, grid) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Indices [Nk] of the kept patches (image by image, in grid order) and their
        straight-through scale [Nk]; (None, None) when pruning is off."""
        if self.scorer is None:
            return None, None
        per_image = grid.n_h * grid.n_w
        n_keep = max(1, math.ceil(self.cfg.keep_fraction * per_image - 1e-9))
        score_BU = self.scorer(pooled_NC.float()).view(grid.batch, per_image)
        top_BK = score_BU.topk(n_keep, dim=1).indices.sort(dim=1).values
        offsets = torch.arange(grid.batch, device=top_BK.device)[:, None] * per_image
        keep_idx = (top_BK + offsets).flatten()
        s = torch.sigmoid(score_BU).flatten()[keep_idx]
        return keep_idx, 1.0 + s - s.detach()

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

"""The thesis's Patch-MoE: route each P x P patch of a feature map to its top-k experts.

Legend
  B batch, H/W map size, C channels, P patch side, N = B*ceil(H/P)*ceil(W/P) patches,
  L = P*P points per patch, K slots per patch, E experts.

Flow (the thesis's steps 1-4):
  [B, H, W, C] --unfold--> units [N, L, C] --mean-pool--> [N, C] --router--> ids/weights [N, K]
  --plan + dispatcher--> expert rows [U, L, C] --experts--> [U, L, C] --dispatcher back-->
  rows [R, L, C] --weighted sum per patch--> [N, L, C] --fold--> [B, H, W, C]
All L points of a patch travel together and share its experts and weights.

Expert choice (``router.choice: expert``): every expert takes the C = ceil(capacity_factor * N * K / E)
routed patches of this rank's batch it scores highest; a patch's output is the sum of probs[n, e] *
expert_e(patch) over the experts that took it, and a patch no expert took passes through as a pruned
one does (``pruned_output``). Every expert gets exactly C rows: nothing is dropped for imbalance.

Dual sparsity (the thesis's pruning, ``keep_fraction`` < 1): before routing, a light scorer (one Linear on
the pooled patch) keeps the top ceil(r * patches per image) patches of each image; only they
are routed, dispatched and computed. Pruned patches pass through (identity, or zero inside a
residual branch). The kept outputs are multiplied by 1 + s - stop_grad(s), s = sigmoid(score):
exactly 1 in the forward pass (kept outputs equal the unpruned layer's), while the scorer
receives a gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from common.timing import StageTimer
from moe.balance import MoEOutput, RoutingStats, coverage_shares, routing_stats
from moe.combine import slot_sum_to_map
from moe.config import PatchMoEConfig
from moe.dispatch import Dispatcher, DispatchPlan, LocalDispatcher, plan_dispatch, unpermute
from moe.experts import build_experts
from moe.indexing import gather_rows
from moe.router import Router, RoutingDecision, expert_capacity
from moe.timing import NullTimer
from moe.units import PatchGrid, PatchView, make_grid, patchify, pool_units, unpatchify


@dataclass(frozen=True)
class RoutedPatches:
    """What the route stage hands to dispatch and combine."""

    grid: PatchGrid
    in_place: bool  # units are read from the map and the output written straight into it
    units_NLC: "torch.Tensor | PatchView"  # every patch [N, L, C]
    routed_NLC: "torch.Tensor | PatchView"  # the routed patches [Nk, L, C] (all N unless pruned)
    keep_idx: torch.Tensor | None  # [Nk] indices of the kept patches (None: no pruning)
    keep_scale: torch.Tensor | None  # [Nk] straight-through scale of the kept outputs
    decision: RoutingDecision  # over the routed patches: ids / weights [Nk, K]
    plan: DispatchPlan  # its rows sorted by expert, capacity applied

    @property
    def num_routed(self) -> int:
        return self.decision.num_units


class PatchMoE(nn.Module):
    """Patch-routed MoE over a [B, H, W, C] feature map (token routing when patch_size=1).

    ``dispatcher`` decides where experts live; the default keeps all of them on this rank.
    ``timer`` measures the stages route / dispatch / experts / combine (nothing by default).
    Both are fixed at construction: the layer never looks up process groups itself. ``expert_seed``
    fixes the experts' initial weights (moe/experts.py): an expert-parallel shard of a layer is built
    with the full layer's, so it starts as that layer's slice.
    """

    def __init__(self, cfg: PatchMoEConfig, dispatcher: Dispatcher | None = None, timer: StageTimer | None = None,
                 expert_seed: int | None = None):
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
        self.experts = build_experts(cfg.expert, self.dispatcher.num_local_experts, cfg.dim,
                                    first=self.dispatcher.first_expert, seed=expert_seed)
        self.register_buffer("pending_load", torch.zeros(e), persistent=False)
        self.scorer = nn.Linear(cfg.dim, 1) if cfg.keep_fraction < 1 else None

    def forward(self, x_BHWC: torch.Tensor) -> MoEOutput:
        """route -> dispatch -> experts -> combine, each a method and a timed stage."""
        with self.timer.stage("route"):
            routed = self.route(x_BHWC)
        if self._pipelines(routed.plan):
            with self.timer.stage("pipelined"):  # dispatch, experts and the way back, chunk by chunk
                back_RLC = self.dispatcher.pipelined(routed.routed_NLC, routed.plan, self.experts,
                                                     self.cfg.overlap_chunks)
            with self.timer.stage("combine"):
                y_BHWC = self.weighted_sum(back_RLC, routed.plan, routed)
            return MoEOutput(y_BHWC, self._routing_stats(routed, routed.plan), routed.decision.weights)
        with self.timer.stage("dispatch"):
            rows_ULC, local_counts_El, meta = self.dispatch(routed)
        with self.timer.stage("experts"):
            out_ULC = self.compute_experts(rows_ULC, local_counts_El, meta)
        with self.timer.stage("combine"):
            y_BHWC = self.combine(out_ULC, meta, routed)
        return MoEOutput(y_BHWC, self._routing_stats(routed, meta.plan), routed.decision.weights)

    def route(self, x_BHWC: torch.Tensor) -> RoutedPatches:
        """Cut the map into patches, prune (dual sparsity), score and plan: no data moves yet."""
        cfg = self.cfg
        grid = make_grid(x_BHWC, cfg.patch_size, cfg.pad_mode)
        if x_BHWC.shape[-1] != cfg.dim:
            raise ValueError(f"PatchMoE(dim={cfg.dim}) got a map with C={x_BHWC.shape[-1]} channels")
        e, k = cfg.router.num_experts, cfg.router.max_k
        choice = cfg.router.choice == "expert"
        # read patches from the map, write back into it (token choice: every patch gets a weighted sum)
        in_place = self.scorer is None and not grid.padded and not choice
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
        capacity = None
        static = getattr(self.dispatcher, "uniform_units", False)  # a static [E, C] plan: split sizes known on the host
        if choice:  # C from this rank's own patch count: a host int, no collective
            capacity = expert_capacity(n_routed, k, e, cfg.capacity_factor or 1.0)
        elif cfg.capacity_factor is not None:  # the group's one capacity (no collective where units are uniform)
            capacity = self.dispatcher.capacity(n_routed, k, e, cfg.capacity_factor)
        decision = self.router(pooled_NC, capacity)
        plan = plan_dispatch(decision, e, capacity, cfg.capacity_priority, static=static)
        return RoutedPatches(grid, in_place, units_NLC, routed_NLC, keep_idx, keep_scale, decision, plan)

    def dispatch(self, routed: RoutedPatches) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The planned rows to their experts' ranks -> (rows [U, L, C], counts [El], meta; meta.plan resolved)."""
        return self.dispatcher.dispatch(routed.routed_NLC, routed.plan)

    def compute_experts(self, rows_ULC: torch.Tensor, local_counts_El: torch.Tensor, meta: Any) -> torch.Tensor:
        """This rank's experts on the rows they received, one grouped matmul: [U, L, C]."""
        return self.experts(rows_ULC, local_counts_El, meta.host_counts)

    def _pipelines(self, plan: DispatchPlan) -> bool:
        """Whether this call takes the pipelined exchange (parallel/overlap.py): chunks asked for, a
        static plan and a dispatcher that can (expert parallel, told every rank routes alike)."""
        return (self.cfg.overlap_chunks > 1 and plan.static_capacity is not None
                and getattr(self.dispatcher, "uniform_units", False) and hasattr(self.dispatcher, "pipelined"))

    def combine(self, out_ULC: torch.Tensor, meta: Any, routed: RoutedPatches) -> torch.Tensor:
        """Expert outputs back, weighted and summed per patch, into the map: [B, H, W, C]."""
        return self.weighted_sum(self.dispatcher.combine(out_ULC, meta), meta.plan, routed)

    def weighted_sum(self, back_RLC: torch.Tensor, plan: DispatchPlan, routed: RoutedPatches) -> torch.Tensor:
        """The rows back in plan order [R, L, C], weighted and summed per patch, into the map."""
        cfg, decision = self.cfg, routed.decision
        if routed.in_place and plan.one_row_per_slot and back_RLC.shape[0] == routed.num_routed * cfg.router.max_k:
            return slot_sum_to_map(back_RLC, decision.weights, plan.slot_of_row, routed.grid)
        y_NLC = unpermute(back_RLC, plan, decision.weights)
        if decision.expert_choice:  # a patch no expert took passes through like a pruned one
            taken_N = decision.taken_counts() > 0
            y_NLC = torch.where(taken_N[:, None, None], y_NLC, self._passed(routed.routed_NLC))
        if routed.keep_idx is not None:
            units_NLC = routed.units_NLC
            base = self._passed(units_NLC)
            y_NLC = base.index_copy(0, routed.keep_idx, y_NLC * routed.keep_scale.to(y_NLC.dtype)[:, None, None])
        return unpatchify(y_NLC, routed.grid)

    def _passed(self, units_NLC: torch.Tensor) -> torch.Tensor:
        """The output of a patch no expert computes: itself, or zero inside a residual branch."""
        return units_NLC if self.cfg.pruned_output == "identity" else torch.zeros_like(units_NLC)

    def _routing_stats(self, routed: RoutedPatches, plan: DispatchPlan) -> RoutingStats:
        """The step's statistics; in training with bias balancing, the load also accumulates for
        :meth:`apply_bias_update`."""
        cfg, decision = self.cfg, routed.decision
        load_E = plan.routed.float()
        if self.training and cfg.router.bias_update_rate > 0:
            self.pending_load += load_E.detach()
        return routing_stats(
            probs_NE=decision.probs, logits_HNE=decision.logits, load_E=load_E,
            kept_E=plan.kept, active_slots=decision.slot_mask.sum(),
            num_units=routed.num_routed, coefs=cfg.balance, pruned_units=routed.grid.num_units - routed.num_routed,
            coverage=coverage_shares(decision.taken_counts()) if decision.expert_choice else None,
        )

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


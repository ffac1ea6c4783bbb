"""The thesis's multi-scale fusion made hierarchical: scale experts per modality, a fine gate over
the scales of each modality, a cross-modal coarse gate over the modalities.

Legend: B images, M modalities (rgb, nir, tir), M' present ones, S scales (4/8/16 windows),
D dim, Ec experts per (modality, scale) cell, K slots per cell (top_k), H gating heads,
E = M*S*Ec experts, N = M'*S*B feature vectors.

For every image and present modality m, with f_ms [B, D] its map's window features (as the flat
fusion: max over s x s window means):
  cell experts: y_ms = sum_k r_msk * expert_(m,s,k)(f_ms)                          [M', S, B, D]
                (r: the cell's router, top-K of its Ec experts; Ec = 1: its one expert, weight 1)
  fine gate:    w_m = mean_h softmax(Gate_m(concat_s f_ms) / T)                    [B, S]
                z_m = sum_s w_ms * y_ms                                            [B, D]
  coarse gate:  c = mean over present m of z_m (the cross-modal context)
                a = mean_h softmax over present m of (Coarse(concat(z_m, c)) + bias_m) / T   [B, M']
  out = sum_m a_m * z_m                                                            [B, D]
An absent modality has no features, no routed rows and no coarse score: the coarse softmax
renormalises over the present ones.

Experts: global id (m*S + s)*Ec + k (a modality's cells contiguous). The N feature vectors are
dispatched as PatchMoE dispatches patches (units [N, 1, D]), so expert parallelism shards these
experts like the blocks' (a local dispatcher by default, all-to-all over the EP group when sharded).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn as nn

from moe.balance import MoEOutput, load_balance_loss, routing_stats
from moe.config import HierarchicalFusionConfig, RouterConfig
from moe.dispatch import Dispatcher, LocalDispatcher, plan_dispatch, slot_counts, unpermute
from moe.experts import build_experts
from moe.multiscale import window_features
from moe.router import GateNetwork, Router, RoutingDecision


class HierarchicalFusion(nn.Module):
    """``dispatcher`` decides where the E experts live (all on this rank by default)."""

    def __init__(self, cfg: HierarchicalFusionConfig, dispatcher: Dispatcher | None = None, expert_seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        m, s, d, ec = cfg.num_modalities, len(cfg.scales), cfg.dim, cfg.experts_per_cell
        e = cfg.num_experts
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(e)
        if e % self.dispatcher.num_local_experts:
            raise ValueError(f"num_experts={e} is not a multiple of the dispatcher's "
                             f"num_local_experts={self.dispatcher.num_local_experts}")
        self.fine_gates = nn.ModuleList(
            GateNetwork(s * d, s, depth=cfg.gate_depth, hidden=(s * d) // 2, heads=cfg.num_heads, dropout=cfg.dropout)
            for _ in range(m))
        self.coarse_gate = GateNetwork(2 * d, 1, depth=cfg.gate_depth, hidden=d, heads=cfg.num_heads,
                                       dropout=cfg.dropout)
        self.modality_bias = nn.Parameter(torch.zeros(m))
        self.cell_routers = nn.ModuleList(
            Router(RouterConfig(num_experts=ec, top_k=cfg.top_k), d) for _ in range(cfg.num_cells)) if ec > 1 else None
        self.experts = build_experts(cfg.expert, self.dispatcher.num_local_experts, d,
                                    first=self.dispatcher.first_expert, seed=expert_seed)
        self.register_buffer("first_expert_MS", (torch.arange(cfg.num_cells) * ec).view(m, s), persistent=False)

    def forward(self, x_NHWD: torch.Tensor, present: Sequence[int]) -> MoEOutput:
        """Maps of the present modalities, modality-major ([M'*B, H, W, D]; ``present``: their
        indices, in that order) -> fused features [B, D]."""
        feats = window_features(x_NHWD, self.cfg.scales)  # S x [M'*B, D]
        b = x_NHWD.shape[0] // len(present)
        return self.fuse(torch.stack(feats).view(len(self.cfg.scales), len(present), b, -1).transpose(0, 1), present)

    def fuse(self, f_MSBD: torch.Tensor, present: Sequence[int]) -> MoEOutput:
        """Window features of the present modalities [M', S, B, D] -> fused features [B, D]."""
        cfg = self.cfg
        present = tuple(present)
        mp, s, b, d = f_MSBD.shape
        if mp != len(present) or s != len(cfg.scales) or not present or len(set(present)) != mp \
                or not all(0 <= m < cfg.num_modalities for m in present):
            raise ValueError(f"HierarchicalFusion: features {tuple(f_MSBD.shape)} for modalities {list(present)}; "
                             f"expected [M', {len(cfg.scales)}, B, D] and M' distinct modalities of 0..{cfg.num_modalities - 1}")
        y_MSBD, cell_aux = self._cell_experts(f_MSBD, present)
        z, fine_w = [], []
        for i, m in enumerate(present):
            logits_HBS = self.fine_gates[m](f_MSBD[i].transpose(0, 1).reshape(b, s * d))
            w_BS = (logits_HBS / cfg.temperature).softmax(-1).mean(0)
            fine_w.append(w_BS)
            z.append(torch.einsum("bs,sbd->bd", w_BS.to(y_MSBD.dtype), y_MSBD[i]))
        z_MBD = torch.stack(z)
        context = z_MBD.mean(0, keepdim=True).expand_as(z_MBD)
        logits_H1N = self.coarse_gate(torch.cat([z_MBD, context], -1).reshape(mp * b, 2 * d))
        bias_M = torch.cat([self.modality_bias[m:m + 1] for m in present]).float()
        logits_HBM = logits_H1N.view(-1, mp, b).transpose(1, 2) + bias_M
        a_BM = (logits_HBM / cfg.temperature).softmax(-1).mean(0)
        out_BD = torch.einsum("bm,mbd->bd", a_BM.to(z_MBD.dtype), z_MBD)

        slot = {m: i for i, m in enumerate(present)}
        zeros = a_BM.new_zeros(b, s)
        joint_BMS = torch.stack([a_BM[:, slot[m], None] * fine_w[slot[m]] if m in slot else zeros
                                 for m in range(cfg.num_modalities)], 1)
        weights = joint_BMS.flatten(1)  # [B, M*S]: modality weight x scale weight, zero for an absent modality
        soft_load = weights.detach().sum(0)
        stats = routing_stats(probs_NE=weights, logits_HNE=None, load_E=soft_load, kept_E=soft_load,
                              active_slots=b * mp * s * cfg.top_k, num_units=b, coefs=cfg.balance)
        if cell_aux is not None:
            stats = dataclasses.replace(stats, aux_loss=stats.aux_loss + cell_aux)
        return MoEOutput(out_BD, stats, weights)

    def _cell_experts(self, f_MSBD: torch.Tensor, present: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every (modality, scale) feature through its cell's experts: [M', S, B, D] (and the cell
        routers' balance loss, None when every cell has one expert)."""
        cfg = self.cfg
        mp, s, b, d = f_MSBD.shape
        units_N1D = f_MSBD.reshape(mp * s * b, 1, d)
        first_C = torch.cat([self.first_expert_MS[m] for m in present])  # [M'*S] first expert of each cell
        if self.cell_routers is None:
            ids_NK = first_C.repeat_interleave(b).unsqueeze(1)
            weights_NK = torch.ones(ids_NK.shape, device=units_N1D.device)
            aux = None
        else:
            ids, weights, aux = [], [], units_N1D.new_zeros((), dtype=torch.float32)
            for i, m in enumerate(present):
                for j in range(s):
                    dec = self.cell_routers[m * s + j](f_MSBD[i, j])
                    ids.append(dec.expert_ids + first_C[i * s + j])
                    weights.append(dec.weights)
                    load = slot_counts(dec.expert_ids, dec.slot_mask, cfg.experts_per_cell).float()
                    aux = aux + cfg.balance.load_balance_coef * load_balance_loss(dec.probs, load) / (mp * s)
            ids_NK, weights_NK = torch.cat(ids), torch.cat(weights)
        mask_NK = torch.ones(ids_NK.shape, dtype=torch.bool, device=ids_NK.device)
        decision = RoutingDecision(ids_NK, weights_NK, mask_NK, weights_NK, None, all_live=True)
        plan = plan_dispatch(decision, cfg.num_experts, None)
        rows_ULD, counts, meta = self.dispatcher.dispatch(units_N1D, plan)
        out_ULD = self.experts(rows_ULD, counts, meta.host_counts)
        y_N1D = unpermute(self.dispatcher.combine(out_ULD, meta), meta.plan, weights_NK)
        return y_N1D.view(mp, s, b, d), aux

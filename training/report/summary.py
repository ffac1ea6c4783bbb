"""summary.json: the run's figures (metrics, losses, throughput, stage times, expert load, memory),
from what the training left (:class:`TrainedRun`) and the final evaluation (:class:`FinalEvaluation`),
and the thesis's routing metrics (:func:`moe_usage`)."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from training.metrics.records import History, RunProgress

if TYPE_CHECKING:
    from parallel.dist import WorldInfo
    from reid.metrics import RetrievalMetrics
    from training.config import RunConfig


@dataclass(frozen=True)
class TrainedRun:
    """What the training left: the config and layout, the steps done and their history."""

    cfg: RunConfig
    world: WorldInfo
    ep_size: int
    steps: int
    progress: RunProgress
    skipped_steps: list
    collapse_events: list
    a2a_per_step: dict  # empty when no step ran in this process (a resume that only reports)
    data_summary: dict
    transport: str = "flat"  # the hierarchical blocks' exchange (train.transport, parallel/transport.py)
    nodes: int | None = None  # nodes of LOCAL_WORLD_SIZE ranks (None: not numbered node by node)


@dataclass(frozen=True)
class FinalEvaluation:
    """What the end of the run measured: retrieval metrics (reid/metrics.py), wall time, memory, cost."""

    metrics: RetrievalMetrics
    untrained: RetrievalMetrics | None  # the untrained model's, if evaluated
    elapsed_s: float
    peak_mem_mb: list[float] | None = None
    model_cost: dict | None = None


def build_summary(run: TrainedRun, final: FinalEvaluation) -> dict:
    """summary.json's dict (the report is written from it: training/report/report.py)."""
    cfg, progress, ev = run.cfg, run.progress, final
    tc, h = cfg.train, progress.history
    last = np.asarray(h.load[-1]) if h.load else np.zeros((0, 0))
    total_load = np.asarray(h.load).sum(0) if h.load else np.zeros((0, 0))
    return {
        "name": cfg.name,
        **ev.metrics.as_dict(),
        "untrained": ev.untrained.as_dict() if ev.untrained is not None else None,
        "loss_history": h.loss,
        "final_loss": h.loss[-1] if h.loss else None,
        "samples_per_s": progress.samples_per_s(tc.p * tc.k),
        "world_size": run.world.world_size,
        "nodes": run.nodes,
        "transport": run.transport,
        "threads_per_rank": torch.get_num_threads(),
        "ep_size": run.ep_size,
        "num_experts": cfg.model.num_experts,
        "moe_layers": len(cfg.model.moe_blocks),
        "steps": run.steps,
        "step_time_ms": progress.step_time_ms(),
        "stage_timing": {"mode": tc.stage_timing, "sampled_steps": progress.stage_samples},
        "expert_load": {
            f"block{b}": {"last_interval": last[i].tolist(), "whole_run": total_load[i].tolist(),
                          "fraction": (total_load[i] / max(total_load[i].sum(), 1)).tolist()}
            for i, b in enumerate(cfg.model.moe_blocks) if i < len(last)
        },
        "fusion_weight_mean": h.fusion_load[-1] if h.fusion_load else None,
        "dropped_fraction": h.dropped[-1] if h.dropped else 0.0,
        "active_experts_per_patch": h.active[-1] if h.active else None,
        "patch_coverage": {f"block{b}": c for b, c in zip(cfg.model.moe_blocks, h.coverage[-1]) if c is not None}
        if h.coverage else {},
        "a2a_bytes_per_step": run.a2a_per_step,
        "model_cost": ev.model_cost,
        "moe_usage": moe_usage(h, [f"block{b}" for b in cfg.model.moe_blocks]),
        "skipped_steps": run.skipped_steps,
        "warnings": progress.warnings,
        "expert_collapse": run.collapse_events,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_mem_mb_per_rank": ev.peak_mem_mb,
        "launcher": run.world.launcher,
        "backend": run.world.backend,
        "device": str(run.world.device),
        "elapsed_s": ev.elapsed_s,
        "data": run.data_summary,
        "history": h.as_dict(),
        "config": cfg.to_dict(),
    }




def moe_usage(history: History, layer_names: list[str], threshold_share: float = 0.5) -> dict:
    """The thesis's routing metrics, per MoE layer and for the multi-scale fusion gate:

    usage_variance   variance over experts of each expert's share of the whole run's routed patches
                     (0 = perfectly even; the load-balance view)
    activation_rate  share of experts (scales) that received at least ``threshold_share`` of an even
                     share (1/E) over the run: the experts really in use
    gate_stability   mean over experts of the standard deviation, across logging intervals, of their
                     share per interval (0 = the routing distribution did not move during training)
    """
    def stats(per_interval: np.ndarray) -> dict:  # [intervals, experts], rows are shares summing to 1
        whole = per_interval.mean(0)
        n = per_interval.shape[1]
        return {"usage_variance": float(whole.var()), "activation_rate": float((whole >= threshold_share / n).mean()),
                "gate_stability": float(per_interval.std(0).mean()), "share": whole.tolist()}

    out: dict = {"threshold_share": threshold_share, "layers": {}}
    if history.load:
        load = np.asarray(history.load, dtype=float)  # [intervals, layers, experts]
        for i, name in enumerate(layer_names[: load.shape[1]]):
            totals = load[:, i].sum(1, keepdims=True)
            keep = totals[:, 0] > 0
            if keep.any():
                out["layers"][name] = stats(load[keep, i] / totals[keep])
    if history.fusion_load:
        fusion = np.asarray(history.fusion_load, dtype=float)  # [intervals, scales] mean gate weights
        out["fusion_gate"] = stats(fusion / fusion.sum(1, keepdims=True))
    return out

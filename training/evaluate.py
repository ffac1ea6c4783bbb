"""Retrieval evaluation under any world size: each rank embeds its shard of the query and
gallery splits, features are gathered across ranks, and every rank computes the metrics.

Every rank runs the same number of forward passes (shards are padded to equal length), which
expert parallelism requires: a layer's all-to-all needs every rank of its group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from reid.data import MODALITIES, chunks, eval_shard, fetch
from reid.metrics import RetrievalMetrics, cosine_distance, evaluate
from training.config import EvalConfig


@dataclass(frozen=True)
class Embeddings:
    feats: np.ndarray  # [N, D] (after BNNeck)
    pids: np.ndarray
    cams: np.ndarray
    fusion_weights: np.ndarray  # [N, S] multi-scale gate weights


def _gather(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def embed(model, split, batch_size: int, rank: int, world_size: int, device, dtype=torch.float32,
          modalities: tuple[str, ...] = tuple(MODALITIES)) -> Embeddings:
    idx, valid = eval_shard(len(split), world_size, rank)
    feats, weights, pids, cams = [], [], [], []
    for part in chunks(idx, batch_size):
        b = fetch(split, part).to(device)
        if dtype != torch.float32:
            b = type(b)(b.rgb.to(dtype), b.nir.to(dtype), b.tir.to(dtype), b.pid, b.camid)
        out = model(b, modalities)
        feats.append(out.feat_bn.float())
        weights.append(out.fusion_weights.float())
        pids.append(b.pid)
        cams.append(b.camid)
    mask = torch.tensor(valid, device=device)
    cat = lambda xs: _gather(torch.cat(xs), world_size)  # noqa: E731
    keep = _gather(mask, world_size).cpu().numpy().astype(bool)
    return Embeddings(
        feats=cat(feats).cpu().numpy()[keep], pids=cat(pids).cpu().numpy()[keep],
        cams=cat(cams).cpu().numpy()[keep], fusion_weights=cat(weights).cpu().numpy()[keep],
    )


def eval_batch(split, batch_size: int, rank: int, world_size: int, device, dtype=torch.float32):
    """This rank's first evaluation batch (every rank's is as large: the shards are padded)."""
    idx, _ = eval_shard(len(split), world_size, rank)
    b = fetch(split, next(iter(chunks(idx, batch_size)))).to(device)
    if dtype != torch.float32:
        b = type(b)(b.rgb.to(dtype), b.nir.to(dtype), b.tir.to(dtype), b.pid, b.camid)
    return b


def retrieval(model, splits, batch_size: int, rank: int, world_size: int, device, max_rank: int = 20,
              dtype=torch.float32, modalities: tuple[str, ...] = tuple(MODALITIES)) -> tuple[RetrievalMetrics, Embeddings]:
    """mAP / CMC of query against gallery, both embedded with only ``modalities`` present."""
    was_training = model.training
    model.eval()
    try:
        q = embed(model, splits["query"], batch_size, rank, world_size, device, dtype, modalities)
        g = embed(model, splits["gallery"], batch_size, rank, world_size, device, dtype, modalities)
    finally:
        model.train(was_training)
    metrics = evaluate(cosine_distance(q.feats, g.feats), q.pids, g.pids, q.cams, g.cams, max_rank=max_rank)
    return metrics, q


class Evaluator:
    """A run's evaluation, on every rank: retrieval with ``eval.modalities`` (or others), with each
    modality absent in turn, and this rank's first query batch (for the model cost)."""

    def __init__(self, model, splits, ec: EvalConfig, rank: int, world_size: int, device, dtype=torch.float32):
        self.model, self.splits, self.ec = model, splits, ec
        self.rank, self.world_size, self.device, self.dtype = rank, world_size, device, dtype

    def retrieval(self, modalities: tuple[str, ...] | None = None) -> tuple[RetrievalMetrics, Embeddings]:
        """Retrieval metrics with ``modalities`` present (default: ``eval.modalities``)."""
        ec = self.ec
        return retrieval(self.model, self.splits, ec.batch_size, self.rank, self.world_size, self.device,
                         ec.max_rank, self.dtype, modalities or ec.modalities)

    def missing_modalities(self) -> dict:
        """mAP / Rank-1 with each modality absent in turn (a standard RGBNT201 evaluation)."""
        out = {}
        for absent in MODALITIES:
            metrics, _ = self.retrieval(tuple(m for m in MODALITIES if m != absent))
            out[f"without_{absent}"] = {"map": metrics.map, "rank1": metrics.rank(1)}
        return out

    def query_batch(self):
        """This rank's first query batch (every rank's is as large)."""
        return eval_batch(self.splits["query"], self.ec.batch_size, self.rank, self.world_size, self.device, self.dtype)

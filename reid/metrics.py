"""Retrieval metrics: CMC and mAP with the standard same-identity same-camera exclusion.

For each query q, the gallery images with q's identity *and* q's camera are removed (they are
"junk": the same person seen by the same camera is not a re-identification). The rest is ranked
by distance (ascending; ties keep gallery order). Then
  CMC_q(r) = 1 if a true match is within the first r ranks
  AP_q     = mean over true matches m of precision at m's rank
and CMC / mAP average over queries that have at least one true match left (queries without one
are counted and skipped, as in the Market-1501 protocol).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RetrievalMetrics:
    map: float
    cmc: np.ndarray  # [max_rank], cmc[r-1] = Rank-r
    num_valid_queries: int
    num_skipped_queries: int

    def rank(self, r: int) -> float:
        return float(self.cmc[r - 1])

    def as_dict(self) -> dict:
        return {"map": self.map, "rank1": self.rank(1), "rank5": self.rank(5), "rank10": self.rank(10),
                "cmc": [float(c) for c in self.cmc], "num_valid_queries": self.num_valid_queries,
                "num_skipped_queries": self.num_skipped_queries}

    @classmethod
    def from_dict(cls, d: dict) -> "RetrievalMetrics":
        """The inverse of :meth:`as_dict` (e.g. a run's saved untrained baseline)."""
        return cls(d["map"], np.asarray(d["cmc"]), d["num_valid_queries"], d["num_skipped_queries"])


def evaluate(dist_QG: np.ndarray, q_pids, g_pids, q_cams, g_cams, max_rank: int = 20) -> RetrievalMetrics:
    dist_QG = np.asarray(dist_QG, dtype=np.float64)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_cams, g_cams = np.asarray(q_cams), np.asarray(g_cams)
    nq, ng = dist_QG.shape
    if len(q_pids) != nq or len(g_pids) != ng:
        raise ValueError(f"distance matrix {dist_QG.shape} does not match {len(q_pids)} queries x {len(g_pids)} gallery")
    order = np.argsort(dist_QG, axis=1, kind="stable")
    cmc_sum = np.zeros(max_rank)
    aps, skipped = [], 0
    for q in range(nq):
        ranked = order[q]
        keep = ~((g_pids[ranked] == q_pids[q]) & (g_cams[ranked] == q_cams[q]))
        match = (g_pids[ranked] == q_pids[q])[keep]
        if not match.any():
            skipped += 1
            continue
        first = int(np.argmax(match))
        hits = np.zeros(max_rank)
        hits[first:] = 1.0 if first < max_rank else 0.0
        cmc_sum += hits
        hit_ranks = np.flatnonzero(match) + 1  # 1-based ranks of the true matches
        aps.append(float(np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks)))
    valid = len(aps)
    if valid == 0:
        raise ValueError("no query has a true match in the gallery under another camera: cannot evaluate")
    return RetrievalMetrics(float(np.mean(aps)), cmc_sum / valid, valid, skipped)


def cosine_distance(q_QD: np.ndarray, g_GD: np.ndarray) -> np.ndarray:
    q = q_QD / np.maximum(np.linalg.norm(q_QD, axis=1, keepdims=True), 1e-12)
    g = g_GD / np.maximum(np.linalg.norm(g_GD, axis=1, keepdims=True), 1e-12)
    return 1.0 - q @ g.T

"""The measured side of ``msmoe report``: the points, their efficiency, and the one-level alpha-beta
all-to-all model fitted to them.

Modelled (labelled so everywhere): t = alpha * (p - 1) + beta * bytes * (p - 1) / p per all-to-all
and rank, fitted by least squares to the measured all-to-all stage times (dispatch + combine,
minus the same stages of the EP=1 twin point). It becomes the "measured" (loopback) preset of the
two-level model (scaling/comm_model.py); the projection and its validation are scaling/projection.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

def load_points(path: str) -> list[dict]:
    recs = []
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i}: not a JSON line ({exc.msg}); was it written by msmoe scale?") from None
    if not recs:
        raise ValueError(f"{path} holds no points: run `msmoe scale` first")
    return recs


def point_label(r: dict) -> str:
    return f"{r['mode'][0]} w{r['world_size']} ep{r['ep_size']} E{r['num_experts']}"


def efficiency(recs: list[dict]) -> list[dict]:
    """Scaling efficiency against the 1-rank point with the same experts (EP=1 there).

    strong: samples/s(w) / (w * samples/s(1)); weak: per-rank samples/s(w) / samples/s(1)."""
    base = {r["num_experts"]: r for r in recs if r["world_size"] == 1}
    rows = []
    for r in recs:
        b = base.get(r["num_experts"])
        if b is None or r["world_size"] == 1:
            continue
        ideal = b["samples_per_s"] * r["world_size"]
        if r["mode"] == "weak":
            eff = (r["samples_per_s"] / r["world_size"]) / b["samples_per_s"]
        else:
            eff = r["samples_per_s"] / ideal
        rows.append({"point": point_label(r), "mode": r["mode"], "world": r["world_size"], "ep": r["ep_size"],
                     "experts": r["num_experts"], "samples_per_s": r["samples_per_s"], "efficiency": eff})
    return rows


@dataclass(frozen=True)
class AlphaBeta:
    alpha_s: float  # per peer and all-to-all
    beta_s_per_byte: float
    fitted_on: int  # points
    note: str

    def a2a_s(self, p: int, bytes_per_rank: float) -> float:
        """One all-to-all of ``bytes_per_rank`` (rows this rank hands in) over p ranks."""
        if p <= 1:
            return 0.0
        return self.alpha_s * (p - 1) + self.beta_s_per_byte * bytes_per_rank * (p - 1) / p


def fit_alpha_beta(recs: list[dict]) -> AlphaBeta | None:
    """Least squares (non-negative) of measured all-to-all time against (peers, off-rank bytes)."""
    twins = {(r["mode"], r["world_size"], r["num_experts"]): r for r in recs if r["ep_size"] == 1}
    rows, ys = [], []
    for r in recs:
        p, a2a = r["ep_size"], r["a2a_bytes_per_step"]
        calls = a2a.get("calls") or 0
        if p < 2 or not calls:
            continue
        ms = r["step_time_ms"]
        t = (ms.get("dispatch", 0.0) + ms.get("combine", 0.0)) / 1e3
        twin = twins.get((r["mode"], r["world_size"], r["num_experts"]))
        if twin:
            t -= (twin["step_time_ms"].get("dispatch", 0.0) + twin["step_time_ms"].get("combine", 0.0)) / 1e3
        fwd_calls = calls / 2  # the forward half (dispatch + combine); backward is timed inside "backward"
        per_call_bytes = a2a["forward"] / max(fwd_calls, 1)
        rows.append([fwd_calls * (p - 1), fwd_calls * per_call_bytes * (p - 1) / p])
        ys.append(max(t, 0.0))
    if not rows:
        return None
    a, y = np.asarray(rows, float), np.asarray(ys, float)
    sol, *_ = np.linalg.lstsq(a, y, rcond=None)
    note = "least squares on (peers, bytes)"
    if (sol < 0).any() or np.linalg.matrix_rank(a) < 2:  # too few distinct points: one parameter
        beta = float((a[:, 1] @ y) / max(a[:, 1] @ a[:, 1], 1e-30))
        sol = np.array([0.0, max(beta, 0.0)])
        note = "bandwidth term only (the points do not separate latency from bandwidth)"
    return AlphaBeta(float(sol[0]), float(sol[1]), len(ys), note)

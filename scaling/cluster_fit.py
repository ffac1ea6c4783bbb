"""The link model of an emulated cluster (points from ``msmoe scale --cluster``, scaling/cluster_sweep.py),
fitted on the 1- and 2-node points, and the held-out prediction of the larger ones.

Legend: W ranks in all, n ranks per node (LOCAL_WORLD_SIZE), m = W / n nodes, P the EP size (EP
groups are consecutive ranks), B the bytes one rank hands to one flat all-to-all, R the rate of one
node's link (tbf-shaped, shared by the node's ranks), L MoE layers.

Measured per point (rank 0): the forward all-to-all time T = dispatch + combine minus the same stages
of the EP=1 point at the same world size (its "twin": the same ranks, no exchange), and the step time.

The model, per step and rank:

  all-to-all, one flat exchange (scaling/comm_model.py ``exchanges``):
      t(B) = s(W) x [alpha x (P - 1) + B_intra x beta]   +   n x B_inter x 8 / R
      the first part runs on the CPUs (gloo over loopback inside a node, the per-peer overhead),
      the second on the node's link: its n ranks send B_inter each through it at once
  dense gradient all-reduce over all W ranks, expert gradients over the W / P replicas of each
  expert (when P < W): gloo's ring (reduce-scatter + all-gather, 2 (r - 1) steps of nbytes / r);
      each step costs s(W) x (alpha + chunk x beta) on the CPUs, or, where ring edges leave a node,
      c x chunk x 8 / R on its link (c = the ring edges leaving that node at once), whichever is longer
  compute c(W) = c0 + c1 x W: the EP=1 points' step minus their modelled all-reduce. On one machine
      every emulated node shares the same cores, so the compute per rank grows with the total number
      of processes; s(W) = c(W) / c(W_1) is that measured oversubscription factor (1 at the smallest
      fitted world), applied to the CPU parts of the exchanges too
  step(W, P) = c(W) + (calls / forward calls) x T(W, P) + all-reduces(W, P)

Fit: c0, c1 on the EP=1 points; beta (alpha = 0: one point per level cannot separate latency from
bandwidth) on the 1-node points (intra level); then R on the points of more than one node (inter
level), given everything else: least squares on T. Everything emulation-specific (shared cores,
the tbf link without delay) is named so in the report (scaling/cluster_report.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scaling.comm_model import exchanges
from scaling.points import point_label

GRAD_BYTES = 4  # fp32 gradients (DeepSpeed all-reduces them in fp32 on CPU)


@dataclass(frozen=True)
class Compute:
    """c(W) = c0 + c1 x W seconds per step; s(W) = c(W) / c(w_ref)."""

    c0_s: float
    c1_s: float
    w_ref: int

    def seconds(self, world: int) -> float:
        return max(self.c0_s + self.c1_s * world, 1e-9)

    def oversubscription(self, world: int) -> float:
        return self.seconds(world) / self.seconds(self.w_ref)


@dataclass(frozen=True)
class ClusterLinks:
    """The fitted emulated cluster: the CPU side of an exchange (per rank, at the reference world
    size) and one node's link."""

    alpha_s: float  # per peer and exchange (0 where not separable)
    beta_s_per_byte: float  # intra-node bytes over loopback
    node_link_bps: float  # one node's link, bits/s, shared by its ranks
    nproc_per_node: int
    compute: Compute

    @property
    def node_link_mbit(self) -> float:
        return self.node_link_bps / 1e6

    def cpu_s(self, world: int, peers: int, nbytes: float) -> float:
        return self.compute.oversubscription(world) * (self.alpha_s * peers + self.beta_s_per_byte * nbytes)

    def link_s(self, nbytes_through_link: float) -> float:
        return nbytes_through_link * 8 / self.node_link_bps if nbytes_through_link else 0.0


# ------------------------------------------------------------------ the model
def a2a_parts(links: ClusterLinks, world: int, ep: int, nbytes: float) -> tuple[float, float]:
    """(CPU seconds, link seconds) of one flat all-to-all of ``nbytes`` per rank over EP = ``ep``."""
    exs = exchanges("flat", ep, links.nproc_per_node, nbytes)
    if not exs:
        return 0.0, 0.0
    (ex,) = exs
    n_send = min(links.nproc_per_node, ep)  # a node's ranks that send across at once (one per EP group slot)
    return (links.cpu_s(world, ex.intra_peers + ex.inter_peers, ex.intra_bytes),
            links.link_s(n_send * ex.inter_bytes) if ex.inter_peers else 0.0)


def a2a_s(links: ClusterLinks, world: int, ep: int, nbytes: float) -> float:
    return sum(a2a_parts(links, world, ep, nbytes))


def rings(world: int, ep: int, kind: str) -> list[list[int]]:
    """The groups whose gradients are all-reduced: ``dense`` all W ranks (one ring), ``expert`` the
    W / P replicas of each EP rank (P rings: ranks i, i + P, ...)."""
    if kind == "dense":
        return [list(range(world))] if world > 1 else []
    if kind == "expert":
        return [list(range(i, world, ep)) for i in range(ep)] if world // ep > 1 else []
    raise ValueError(f"ring kind {kind!r}: dense or expert")


def ring_allreduce_s(links: ClusterLinks, world: int, groups: list[list[int]], nbytes: float) -> float:
    """Concurrent ring all-reduces of ``nbytes`` over each group (see the module docstring)."""
    if not groups or not nbytes:
        return 0.0
    n = links.nproc_per_node
    r = len(groups[0])
    if any(len(g) != r for g in groups):
        raise ValueError(f"ring groups of unequal sizes: {[len(g) for g in groups]}")
    chunk = nbytes / r
    leaving: dict[int, int] = {}
    for g in groups:
        for a, b in zip(g, g[1:] + g[:1]):
            if a // n != b // n:
                leaving[a // n] = leaving.get(a // n, 0) + 1
    cpu = links.cpu_s(world, 1, chunk)
    link = links.link_s(max(leaving.values()) * chunk) if leaving else 0.0
    return 2 * (r - 1) * max(cpu, link)


def allreduce_s(links: ClusterLinks, world: int, ep: int, dense_params: float,
                expert_params: float | None) -> tuple[float, float]:
    """(dense, expert) gradient all-reduce seconds per step at (W, P)."""
    dense = ring_allreduce_s(links, world, rings(world, ep, "dense"), dense_params * GRAD_BYTES)
    expert = 0.0
    if expert_params and world // ep > 1:
        expert = ring_allreduce_s(links, world, rings(world, ep, "expert"), expert_params / ep * GRAD_BYTES)
    return dense, expert


# ------------------------------------------------------------------ the points
@dataclass(frozen=True)
class PointView:
    """What the fit reads from one point (a ``points.jsonl`` record of ``msmoe scale --cluster``)."""

    label: str
    world: int
    ep: int
    nodes: int
    nproc_per_node: int
    link_mbit: float | None
    fwd_calls: float
    calls: float
    fwd_bytes_per_call: float
    bytes_per_call: float
    dense_params: float
    expert_params: float | None
    step_s: float
    stages_s: float  # dispatch + combine, forward

    @classmethod
    def of(cls, r: dict) -> "PointView":
        c = r.get("cluster") or {}
        nodes = c.get("nodes") or r.get("nodes")
        if not nodes or not r.get("dense_params"):
            raise ValueError(f"point {point_label(r)}: no cluster nodes or dense parameter count in its record; "
                             "was it measured by `msmoe scale --cluster` (scaling/cluster_sweep.py)?")
        a2a, ms = r["a2a_bytes_per_step"], r["step_time_ms"]
        calls = float(a2a.get("calls") or 0)
        fwd_calls = calls / 2
        return cls(point_label(r), r["world_size"], r["ep_size"], int(nodes),
                   int(c.get("nproc_per_node") or r["world_size"] // nodes), c.get("link_mbit"), fwd_calls, calls,
                   a2a["forward"] / fwd_calls if fwd_calls else 0.0, a2a["total"] / calls if calls else 0.0,
                   float(r["dense_params"]), r.get("expert_params"), ms["step"] / 1e3,
                   (ms.get("dispatch", 0.0) + ms.get("combine", 0.0)) / 1e3)


def measured_a2a_s(p: PointView, twins: dict[int, PointView]) -> float | None:
    """Forward all-to-all seconds per step: dispatch + combine minus the EP=1 twin's."""
    t = twins.get(p.world)
    return None if t is None or p.ep < 2 else max(p.stages_s - t.stages_s, 0.0)


def predict(links: ClusterLinks, p: PointView) -> dict:
    """The model's forward all-to-all, all-reduces and step for point ``p``."""
    fwd = p.fwd_calls * a2a_s(links, p.world, p.ep, p.fwd_bytes_per_call)
    a2a_all = p.calls * a2a_s(links, p.world, p.ep, p.bytes_per_call)
    dense, expert = allreduce_s(links, p.world, p.ep, p.dense_params, p.expert_params)
    comp = links.compute.seconds(p.world)
    return {"a2a_s": fwd, "a2a_step_s": a2a_all, "dense_ar_s": dense, "expert_ar_s": expert, "compute_s": comp,
            "step_s": comp + a2a_all + dense + expert}


# ------------------------------------------------------------------ the fit
@dataclass(frozen=True)
class LinkFit:
    links: ClusterLinks
    shaped_mbit: float | None
    fit_on: tuple[str, ...]
    note: str


def _views(recs: list[dict]) -> list[PointView]:
    return [PointView.of(r) for r in recs if r.get("mode") != "placement"]


def fit_links(recs: list[dict], max_nodes: int = 2, iterations: int = 200, rtol: float = 1e-10) -> LinkFit:
    """Fit the model on the points of at most ``max_nodes`` nodes (see the module docstring).
    Raises ValueError naming what is missing."""
    pts = [p for p in _views(recs) if p.nodes <= max_nodes]
    n_set = {p.nproc_per_node for p in pts}
    if len(n_set) != 1:
        raise ValueError(f"the points to fit on have ranks per node {sorted(n_set) or 'none'}: sweep one "
                         "--nproc-per-node")
    n = n_set.pop()
    twins = {p.world: p for p in pts if p.ep == 1}
    one_node = [p for p in pts if p.nodes == 1 and p.ep >= 2 and p.world in twins]
    multi = [p for p in pts if p.nodes > 1 and p.ep > n and p.world in twins]
    need = [f"{what}" for what, have in (("EP=1 points at two world sizes (the compute line)", len(twins) >= 2),
                                         ("a 1-node point with EP >= 2 and its EP=1 twin (the intra level)", one_node),
                                         (f"a point on 2+ nodes with EP > {n} and its twin (the inter level)", multi))
            if not have]
    if need:
        raise ValueError("cannot fit the cluster's link model: no " + "; no ".join(need) +
                         f" among the points of <= {max_nodes} nodes (msmoe scale --cluster 1,2 ... --ep 1,2,4)")
    w_ref = min(twins)
    # start: compute from the twins' steps, a fast link; then refine compute and the link together
    compute = _line([(w, t.step_s) for w, t in twins.items()], w_ref)
    links = ClusterLinks(0.0, 0.0, 1e12, n, compute)
    for _ in range(iterations):
        compute = _line([(w, t.step_s - sum(allreduce_s(links, w, 1, t.dense_params, t.expert_params)))
                          for w, t in twins.items()],
                        w_ref)
        links = ClusterLinks(0.0, links.beta_s_per_byte, links.node_link_bps, n, compute)
        # intra: T = s(W) * beta * fwd_calls * B_intra on the 1-node points
        xs, ys = [], []
        for p in one_node:
            (ex,) = exchanges("flat", p.ep, n, p.fwd_bytes_per_call)
            xs.append(compute.oversubscription(p.world) * p.fwd_calls * ex.intra_bytes)
            ys.append(measured_a2a_s(p, twins))
        beta = max(float(np.dot(xs, ys) / max(np.dot(xs, xs), 1e-30)), 0.0)
        links = ClusterLinks(0.0, beta, links.node_link_bps, n, compute)
        # inter: T - CPU part = fwd_calls * n_send * B_inter * 8 / R, for 1 / R
        xs, ys = [], []
        for p in multi:
            (ex,) = exchanges("flat", p.ep, n, p.fwd_bytes_per_call)
            cpu, _ = a2a_parts(links, p.world, p.ep, p.fwd_bytes_per_call)
            xs.append(p.fwd_calls * min(n, p.ep) * ex.inter_bytes * 8)
            ys.append(measured_a2a_s(p, twins) - p.fwd_calls * cpu)
        inv_r = float(np.dot(xs, ys) / max(np.dot(xs, xs), 1e-30))
        before = links
        links = ClusterLinks(0.0, beta, 1.0 / inv_r if inv_r > 0 else float("inf"), n, compute)
        if abs(links.node_link_bps - before.node_link_bps) <= rtol * links.node_link_bps and \
                abs(links.beta_s_per_byte - before.beta_s_per_byte) <= rtol * max(links.beta_s_per_byte, 1e-30):
            break  # the all-reduce in the compute line and the link agree: a fixed point
    shaped = {p.link_mbit for p in pts if p.nodes > 1}
    fit_on = tuple(p.label + f" ({p.nodes}n)" for p in [*twins.values(), *one_node, *multi])
    return LinkFit(links, shaped.pop() if len(shaped) == 1 else None, fit_on,
                   "compute line on the EP=1 points, intra bytes on the 1-node points, node link on the 2-node points "
                   "(alpha = 0: one point per level cannot separate latency from bandwidth)")


def _line(pts: list[tuple[int, float]], w_ref: int) -> Compute:
    w = np.asarray([p[0] for p in pts], float)
    y = np.asarray([p[1] for p in pts], float)
    c1, c0 = np.polyfit(w, y, 1) if len(set(w)) > 1 else (0.0, float(y.mean()))
    return Compute(float(c0), float(c1), w_ref)


def held_out(recs: list[dict], max_nodes: int = 2) -> dict:
    """Fit on <= ``max_nodes`` nodes, predict every point of more nodes: rows of predicted vs measured."""
    fit = fit_links(recs, max_nodes)
    views = _views(recs)
    twins = {p.world: p for p in views if p.ep == 1}
    rows = []
    for p in views:
        if p.nodes <= max_nodes:
            continue
        pred = predict(fit.links, p)
        meas = measured_a2a_s(p, twins)
        rows.append({"point": p.label, "nodes": p.nodes, "world": p.world, "ep": p.ep,
                     "a2a_pred_ms": 1e3 * pred["a2a_s"] if p.ep > 1 else None,
                     "a2a_meas_ms": None if meas is None else 1e3 * meas,
                     "step_pred_ms": 1e3 * pred["step_s"], "step_meas_ms": 1e3 * p.step_s,
                     "dense_ar_ms": 1e3 * pred["dense_ar_s"], "expert_ar_ms": 1e3 * pred["expert_ar_s"],
                     "compute_ms": 1e3 * pred["compute_s"], "oversubscription": fit.links.compute.oversubscription(p.world)})
    return {"fit": fit, "rows": rows, "max_nodes": max_nodes}

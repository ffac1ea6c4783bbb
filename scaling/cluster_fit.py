"""The link model of an emulated cluster (points from ``msmoe scale --cluster``, scaling/cluster_sweep.py),
fitted on the 1- and 2-node points, and the held-out prediction of the points on more nodes.

Legend: W ranks in all, n ranks per node, m = W / n nodes, P the EP size (EP groups are consecutive
ranks, n_g = min(n, P) of a group on one node), B the bytes one rank hands to one flat all-to-all,
B_off = B (P - 1) / P of them leave the rank, B_inter = B (P - n_g) / P go to other nodes, R the
rate of one node's (tbf-shaped) link, shared by its ranks.

Measured per point (rank 0): the forward all-to-all time T = dispatch + combine minus the same stages
of the EP=1 point of the same cluster and world size (the same ranks, no exchange), and the step
time.

Why one-node twins. On one machine every emulated node shares the same cores: with W processes on
them, compute and the CPU side of every exchange (gloo, the kernel's TCP over loopback or veth)
slow down with W, not with the nodes. Each multi-node point therefore has a one-node twin, the same
W processes and EP on one node (no link between them); the CPU level is fitted on the one-node
points per W (the measured oversubscription, reported as the factor s(W) against the smallest W),
the link on top of it.

The model, per forward exchange and rank:

  T(W, P, B) = cpu + link
      cpu: the one-node twin's measured all-to-all (the same processes, EP and routing, no link), scaled
           by the bytes; where a point has no twin measurement, the fitted CPU level
           alpha_W (P - 1) + beta_W B_off
      link: the busiest node link's bytes x 8 / R. With F_j the share of the routed rows that go to the
           experts on node j of an EP group (the run's measured expert load; even routing: n / P), node j
           sends n B (1 - F_j) out and receives (P - n) B F_j in, each direction shaped on its own;
           even routing gives n B_inter both ways (the node's n ranks share its link). The CPU work and
           the wait on the link add: gloo's exchange does not overlap them
  gradient all-reduce (gloo's ring: reduce-scatter + all-gather, 2 (r - 1) steps of nbytes / r),
      dense parameters over all W ranks, expert gradients over the W / P replicas of each expert (P < W):
      a step costs alpha_W + beta_W chunk on the CPUs, or c chunk x 8 / R where ring edges leave a
      node (c of them leave the busiest node at once), whichever is longer
  step(m nodes) = step of the one-node twin
                  + every payload exchange's link time (forward and backward)
                  + the all-reduces on m nodes minus the same on one node
                  + the CPU cost of this point's bytes minus the twin's (the fitted level; ~0: same routing)

Fit: alpha_W, beta_W by non-negative least squares on the one-node points of world W (beta alone
where the points cannot separate them): the all-reduces' CPU side and the report's s(W); then 1 / R
by least squares on T - cpu of the points on 2 to ``max_nodes`` nodes whose exchange crosses nodes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from scaling.points import point_label

GRAD_BYTES = 4  # fp32 gradients (DeepSpeed all-reduces them in fp32 on CPU)


@dataclass(frozen=True)
class CpuLevel:
    """One world size's CPU side of an exchange (fitted on its one-node points)."""

    alpha_s: float  # per peer and exchange
    beta_s_per_byte: float  # per byte leaving the rank
    fitted_on: int  # points


@dataclass(frozen=True)
class ClusterLinks:
    cpu: dict  # world size -> CpuLevel
    node_link_bps: float  # one node's link, bits/s, shared by its ranks
    nproc_per_node: int

    @property
    def node_link_mbit(self) -> float:
        return self.node_link_bps / 1e6

    def level(self, world: int) -> CpuLevel:
        if world not in self.cpu:
            raise ValueError(f"no one-node points at world {world} (the CPU side of its exchanges, measured with the "
                             f"same {world} processes on one node): sweep with msmoe scale --cluster, which runs them")
        return self.cpu[world]

    def cpu_s(self, world: int, peers: int, nbytes: float) -> float:
        lv = self.level(world)
        return lv.alpha_s * peers + lv.beta_s_per_byte * nbytes

    def link_s(self, nbytes_through_link: float) -> float:
        return nbytes_through_link * 8 / self.node_link_bps if nbytes_through_link else 0.0

    def oversubscription(self, world: int, w_ref: int | None = None) -> float:
        """s(W): the CPU cost of one byte leaving a rank at W processes against the smallest W."""
        w_ref = w_ref or min(self.cpu)
        ref = self.cpu[w_ref].beta_s_per_byte
        return self.level(world).beta_s_per_byte / ref if ref else float("nan")


# ------------------------------------------------------------------ the model
def node_link_bytes(n: int, ep: int, nbytes: float, load: Sequence[float] | None = None) -> float:
    """Bytes through the busiest node link in one flat all-to-all of ``nbytes`` per rank over EP groups of
    ``ep`` ranks, ``n`` per node: a node's ranks send the rows for other nodes' experts out, the group's
    other ranks send the rows for its experts in (each direction of a link shaped on its own).
    ``load``: each expert's share of the routed rows (the run's ``expert_load`` fraction; None: even)."""
    if ep <= n:
        return 0.0
    if not load:
        return n * nbytes * (ep - n) / ep  # even routing: in = out = n B_inter
    per_rank = len(load) / ep
    shares = [0.0] * (ep // n)  # F_j: the rows for the experts on node j of the group
    for e, f in enumerate(load):
        shares[int(e // per_rank) // n] += f / sum(load)
    return max(max((ep - n) * nbytes * f, n * nbytes * (1 - f)) for f in shares)


def a2a_parts(links: ClusterLinks, world: int, ep: int, nbytes: float, nodes: int,
              load: Sequence[Sequence[float]] = ()) -> tuple[float, float]:
    """(CPU seconds, link seconds) of one flat all-to-all of ``nbytes`` per rank over EP = ``ep``, on
    ``nodes`` nodes (one node: every peer inside it); ``load``: per MoE layer its experts' shares (the
    link time is the layers' mean; none: even routing)."""
    if ep < 2:
        return 0.0, 0.0
    n = links.nproc_per_node if nodes > 1 else world
    cpu = links.cpu_s(world, ep - 1, nbytes * (ep - 1) / ep)
    if nodes <= 1:
        return cpu, 0.0
    layers = list(load) or [None]
    link = sum(links.link_s(node_link_bytes(n, ep, nbytes, f)) for f in layers) / len(layers)
    return cpu, link


def rings(world: int, ep: int, kind: str) -> list[list[int]]:
    """The groups whose gradients are all-reduced: ``dense`` all W ranks (one ring), ``expert`` the
    W / P replicas of each EP rank (P rings: ranks i, i + P, ...)."""
    if kind == "dense":
        return [list(range(world))] if world > 1 else []
    if kind == "expert":
        return [list(range(i, world, ep)) for i in range(ep)] if world // ep > 1 else []
    raise ValueError(f"ring kind {kind!r}: dense or expert")


def ring_allreduce_s(links: ClusterLinks, world: int, groups: list[list[int]], nbytes: float, nodes: int) -> float:
    """Concurrent ring all-reduces of ``nbytes`` over each group (see the module docstring)."""
    if not groups or not nbytes:
        return 0.0
    n = links.nproc_per_node if nodes > 1 else world
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


def allreduce_s(links: ClusterLinks, world: int, ep: int, dense_params: float, expert_params: float | None,
                nodes: int) -> tuple[float, float]:
    """(dense, expert) gradient all-reduce seconds per step at (W, P) on ``nodes`` nodes."""
    dense = ring_allreduce_s(links, world, rings(world, ep, "dense"), dense_params * GRAD_BYTES, nodes)
    expert = 0.0
    if expert_params and world // ep > 1:
        expert = ring_allreduce_s(links, world, rings(world, ep, "expert"), expert_params / ep * GRAD_BYTES, nodes)
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
    load: tuple = ()  # per MoE layer, each expert's share of the routed rows (the run's expert_load)

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
        return cls(f"{point_label(r)} n{nodes}", r["world_size"], r["ep_size"], int(nodes),
                   int(c.get("nproc_per_node") or r["world_size"] // nodes), c.get("link_mbit"), fwd_calls, calls,
                   a2a["forward"] / fwd_calls if fwd_calls else 0.0, a2a["total"] / calls if calls else 0.0,
                   float(r["dense_params"]), r.get("expert_params"), ms["step"] / 1e3,
                   (ms.get("dispatch", 0.0) + ms.get("combine", 0.0)) / 1e3,
                   tuple(tuple(f) for f in (r.get("expert_load_fraction") or {}).values() if f))


def views(recs: list[dict], even_routing: bool = False) -> dict[tuple[int, int, int], PointView]:
    """(nodes, world, EP) -> the point (placement runs left out); ``even_routing`` drops the measured
    expert loads (every expert the same share)."""
    out = {}
    for r in recs:
        if r.get("mode") in ("weak", "strong"):
            p = PointView.of(r)
            out[(p.nodes, p.world, p.ep)] = dataclasses.replace(p, load=()) if even_routing else p
    return out


def measured_a2a_s(p: PointView, pts: dict) -> float | None:
    """Forward all-to-all seconds per step: dispatch + combine minus the EP=1 twin's (same cluster and world)."""
    t = pts.get((p.nodes, p.world, 1))
    return None if t is None or p.ep < 2 else max(p.stages_s - t.stages_s, 0.0)


def comm_s(links: ClusterLinks, p: PointView, nodes: int, with_link: bool = True) -> float:
    """Every exchange and all-reduce of ``p``'s step as the model has them on ``nodes`` nodes."""
    cpu, link = a2a_parts(links, p.world, p.ep, p.bytes_per_call, nodes, p.load)
    dense, expert = allreduce_s(links, p.world, p.ep, p.dense_params, p.expert_params, nodes)
    return p.calls * (cpu + (link if with_link else 0.0)) + dense + expert


def twin_cpu_s(links: ClusterLinks, p: PointView, twin: PointView, twin_a2a_s: float | None) -> float:
    """The CPU side of ``p``'s forward exchanges: its one-node twin's measured all-to-all (the same processes,
    EP and routing, no link), scaled by the bytes; the fitted CPU level where the twin has none."""
    if twin_a2a_s is None or not twin.fwd_bytes_per_call:
        return p.fwd_calls * a2a_parts(links, p.world, p.ep, p.fwd_bytes_per_call, 1)[0]
    return twin_a2a_s * p.fwd_bytes_per_call / twin.fwd_bytes_per_call


def predict(links: ClusterLinks, p: PointView, twin: PointView, twin_a2a_s: float | None = None) -> dict:
    """The model's forward all-to-all and step for point ``p`` from its one-node ``twin`` and the twin's
    measured forward all-to-all (see the module docstring)."""
    _, link = a2a_parts(links, p.world, p.ep, p.fwd_bytes_per_call, p.nodes, p.load)
    dense, expert = allreduce_s(links, p.world, p.ep, p.dense_params, p.expert_params, p.nodes)
    step = twin.step_s + comm_s(links, p, p.nodes) - comm_s(links, twin, 1)
    a2a = twin_cpu_s(links, p, twin, twin_a2a_s) + p.fwd_calls * link if p.ep > 1 else 0.0
    return {"a2a_s": a2a, "a2a_link_s": p.fwd_calls * link, "dense_ar_s": dense,
            "expert_ar_s": expert, "twin_step_s": twin.step_s, "step_s": step}


# ------------------------------------------------------------------ the fit
@dataclass(frozen=True)
class LinkFit:
    links: ClusterLinks
    shaped_mbit: float | None
    cpu_fit_on: tuple[str, ...]
    link_fit_on: tuple[str, ...]


def _nnls2(rows: list[list[float]], ys: list[float]) -> tuple[float, float]:
    """(alpha, beta) >= 0 by least squares; beta alone where the rows cannot separate them."""
    a, y = np.asarray(rows, float), np.asarray(ys, float)
    if len(rows) >= 2 and np.linalg.matrix_rank(a) == 2:
        sol, *_ = np.linalg.lstsq(a, y, rcond=None)
        if (sol >= 0).all():
            return float(sol[0]), float(sol[1])
        one = [(0.0, max(float(a[:, 1] @ y / (a[:, 1] @ a[:, 1])), 0.0)),
               (max(float(a[:, 0] @ y / (a[:, 0] @ a[:, 0])), 0.0), 0.0)]
        return min(one, key=lambda s: float(np.sum((a @ np.asarray(s) - y) ** 2)))
    return 0.0, max(float(a[:, 1] @ y / max(a[:, 1] @ a[:, 1], 1e-30)), 0.0)


def fit_links(recs: list[dict], max_nodes: int = 2, even_routing: bool = False) -> LinkFit:
    """Fit the CPU level per world on the one-node points and the node link on the points of 2 to
    ``max_nodes`` nodes (the busiest link from the measured expert loads, or ``even_routing``). Raises
    ValueError naming what is missing."""
    pts = views(recs, even_routing)
    multi = [p for p in pts.values() if 1 < p.nodes <= max_nodes]
    n_set = {p.nproc_per_node for p in multi}
    if len(n_set) > 1:
        raise ValueError(f"the multi-node points have ranks per node {sorted(n_set)}: sweep one --nproc-per-node")
    cpu, cpu_on = {}, []
    for w in sorted({p.world for p in pts.values() if p.nodes == 1}):
        ones = [p for p in pts.values() if p.nodes == 1 and p.world == w and p.ep >= 2 and p.fwd_calls
                and measured_a2a_s(p, pts) is not None]
        if not ones:
            continue
        rows = [[p.fwd_calls * (p.ep - 1), p.fwd_calls * p.fwd_bytes_per_call * (p.ep - 1) / p.ep] for p in ones]
        alpha, beta = _nnls2(rows, [measured_a2a_s(p, pts) for p in ones])
        cpu[w] = CpuLevel(alpha, beta, len(ones))
        cpu_on += [p.label for p in ones]
    crossing = [p for p in multi if p.ep > p.nproc_per_node and p.fwd_calls and measured_a2a_s(p, pts) is not None
                and p.world in cpu and (1, p.world, p.ep) in pts]
    if not cpu or not crossing:
        what = ("one-node points with EP >= 2 and their EP=1 twins (the CPU level)" if not cpu else
                f"a point on 2..{max_nodes} nodes whose exchange crosses nodes (EP > ranks per node), its EP=1 twin "
                "and one-node points at its world size (the link)")
        raise ValueError(f"cannot fit the cluster's link model: no {what}; sweep msmoe scale --cluster 1,2 "
                         "--ep 1,2,4 (or more)")
    n = n_set.pop()
    links = ClusterLinks(cpu, float("inf"), n)
    xs, ys = [], []
    for p in crossing:
        twin = pts[(1, p.world, p.ep)]
        c = twin_cpu_s(links, p, twin, measured_a2a_s(twin, pts)) / p.fwd_calls
        layers = list(p.load) or [None]
        busiest = sum(node_link_bytes(n, p.ep, p.fwd_bytes_per_call, f) for f in layers) / len(layers)
        xs.append(p.fwd_calls * busiest * 8)
        ys.append(measured_a2a_s(p, pts) - p.fwd_calls * c)
    inv_r = float(np.dot(xs, ys) / max(np.dot(xs, xs), 1e-30))
    links = ClusterLinks(cpu, 1.0 / inv_r if inv_r > 0 else float("inf"), n)
    shaped = {p.link_mbit for p in multi}
    return LinkFit(links, shaped.pop() if len(shaped) == 1 else None, tuple(cpu_on), tuple(p.label for p in crossing))


def held_out(recs: list[dict], max_nodes: int = 2, even_routing: bool = False) -> dict:
    """Fit on <= ``max_nodes`` nodes, predict every point of more nodes from its one-node twin."""
    fit = fit_links(recs, max_nodes, even_routing)
    pts = views(recs, even_routing)
    rows = []
    for (m, w, ep), p in sorted(pts.items()):
        if m <= max_nodes:
            continue
        twin = pts.get((1, w, ep))
        if twin is None:
            raise ValueError(f"point {p.label}: no one-node twin (world {w}, EP {ep} on one node) to predict it from; "
                             "msmoe scale --cluster runs one for every multi-node point")
        pred = predict(fit.links, p, twin, measured_a2a_s(twin, pts))
        meas = measured_a2a_s(p, pts)
        rows.append({"point": p.label, "nodes": m, "world": w, "ep": ep,
                     "a2a_pred_ms": 1e3 * pred["a2a_s"] if ep > 1 else None,
                     "a2a_meas_ms": None if meas is None else 1e3 * meas,
                     "a2a_link_ms": 1e3 * pred["a2a_link_s"],
                     "step_pred_ms": 1e3 * pred["step_s"], "step_meas_ms": 1e3 * p.step_s,
                     "twin_step_ms": 1e3 * pred["twin_step_s"], "dense_ar_ms": 1e3 * pred["dense_ar_s"],
                     "expert_ar_ms": 1e3 * pred["expert_ar_s"]})
    return {"fit": fit, "rows": rows, "max_nodes": max_nodes}

"""The scaling sweep on an emulated cluster (``msmoe scale --cluster 1,2,4``; command line in
launcher/scale.py): each point a real ``msmoe train`` with one torchrun agent per emulated node
(cluster/agents.py) on network namespaces behind a switch, each node's link shaped with tbf
(cluster/netns.py).

  msmoe scale --cluster 1,2,4 --nproc-per-node 2 --link-mbit 100 --run-root runs/cluster-scale

Per node count one cluster is built, every point of that node count runs on it in turn, and it is
torn down (also on a failure or Ctrl-C) before the next. Points: weak scaling (the per-rank batch
fixed), world = nodes x nproc-per-node, every EP size of ``--ep`` that divides the world and the
expert count (EP=1 always: the compute twin). On top, with ``--placement-nodes M`` (default 2),
the hierarchical grouped model (configs/hierarchical.yaml, shrunk) at EP = world on M nodes, once
with ``train.transport=flat`` and once with ``node_local``: flat vs node-local placement measured.

Every point's summary.json gains ``cluster``: the node count, ranks per node, the shaped link rate
and the machine's cores (what the link fit of scaling/cluster_fit.py needs); the JSON lines
(``points.jsonl``, ``placement.jsonl``) are written from them (scaling/sweep.py ``point_record``).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

from scaling.sweep import POINT_PREFIX, ScaleError, environment, point_record

PLACEMENT_PREFIX = "placement"
TRANSPORTS = ("flat", "node_local")
HIERARCHICAL_CONFIG = "configs/hierarchical.yaml"
# configs/hierarchical.yaml at a size that trains in seconds per point, with one group of 4 experts per
# node (2 groups x 4 = 8 experts, EP = 4 on 2 nodes of 2: node-local transport needs every group on one node)
HIERARCHICAL_SHRINK = (
    "model.hierarchical.num_groups=2", "model.hierarchical.coarse.num_experts=2",
    "data.path=data_cache/synth_cluster_scale",
    "data.synth={num_train_ids: 32, num_test_ids: 8, num_cameras: 3, images_per_camera: 3, height: 128, width: 64}",
    "train.warmup_steps=3", "eval.untrained=false")
Target = Callable[[Sequence[str]], list[str]]  # launcher/command.py msmoe_target: msmoe ARGS as a torchrun target


@dataclass(frozen=True)
class ClusterSweepSpec:
    """What ``msmoe scale --cluster`` runs: node counts, ranks per node, the shaped link, the points."""

    config: str = "configs/scale.yaml"
    nodes: tuple[int, ...] = (1, 2, 4)
    nproc_per_node: int = 2
    link_mbit: float = 100.0
    eps: tuple[int, ...] = (1, 2, 4, 8)
    experts: int = 8
    base_p: int = 4  # identities per rank and step (weak scaling: train.p = base_p x world)
    steps: int = 32
    sample_every: int = 2  # train.log_every: the stage breakdown is timed on every 2nd step
    placement_nodes: int | None = 2  # flat vs node-local on this many nodes; None: not run
    run_root: str = "runs/cluster-scale"
    timeout_s: float = 900.0
    overrides: tuple[str, ...] = field(default=())

    def world(self, nodes: int) -> int:
        return nodes * self.nproc_per_node


def check_spec(spec: ClusterSweepSpec) -> None:
    """Refuse, naming the flag, what cannot run before anything is built."""
    if not spec.nodes or min(spec.nodes) < 1 or max(spec.nodes) > 9:
        raise ScaleError(f"--cluster {','.join(map(str, spec.nodes))}: node counts between 1 and 9 (node ranks follow "
                         "the addresses 10.79.0.1-9), e.g. --cluster 1,2,4")
    if spec.nproc_per_node < 1:
        raise ScaleError(f"--nproc-per-node {spec.nproc_per_node}: must be >= 1 (ranks per emulated node)")
    if not spec.link_mbit > 0:
        raise ScaleError(f"--link-mbit {spec.link_mbit}: must be > 0 (each node link's tbf rate, Mbit/s), "
                         "e.g. --link-mbit 100")
    if spec.placement_nodes is not None and spec.placement_nodes < 2:
        raise ScaleError(f"--placement-nodes {spec.placement_nodes}: flat vs node-local needs >= 2 nodes (0: leave "
                         "it out)")


def check_here() -> None:
    from cluster import netns

    why = netns.available()
    if why:
        raise ScaleError(f"msmoe scale --cluster builds network namespaces and shapes links with tc, which {why}; "
                         "run it as root (sudo make cluster-report) on a machine with iproute2, or drop --cluster "
                         "for the one-machine sweep")


@dataclass(frozen=True)
class ClusterPoint:
    """One weak-scaling point: ``world`` ranks on ``nodes`` emulated nodes, EP = ``ep``."""

    nodes: int
    world: int
    ep: int
    experts: int

    @property
    def nproc_per_node(self) -> int:
        return self.world // self.nodes

    @property
    def name(self) -> str:
        return f"{POINT_PREFIX}-weak-n{self.nodes}-w{self.world}-ep{self.ep}-e{self.experts}"

    def overrides(self, base_p: int) -> list[str]:
        return [f"name={self.name}", f"train.ep_size={self.ep}", f"train.p={base_p * self.world}",
                f"model.patch_moe.router.num_experts={self.experts}"]


def plan(spec: ClusterSweepSpec) -> dict[int, list[ClusterPoint]]:
    """node count -> its weak-scaling points (EP dividing the world and the experts; EP=1 always: the
    compute twin). One node also runs every larger world with all its ranks there (the one-node twin
    of each multi-node point: the same processes on the same cores, no link between them)."""
    out: dict[int, list[ClusterPoint]] = {}
    for m in sorted({1, *spec.nodes}):
        w = spec.world(m)
        eps = sorted({1, *(e for e in spec.eps if e <= w and w % e == 0 and spec.experts % e == 0)})
        out.setdefault(m, []).extend(ClusterPoint(m, w, ep, spec.experts) for ep in eps)
        if m > 1:
            out.setdefault(1, []).extend(ClusterPoint(1, w, ep, spec.experts) for ep in eps)
    return {m: sorted(pts, key=lambda p: (p.world, p.ep)) for m, pts in out.items()}


@dataclass(frozen=True)
class ClusterRun:
    name: str
    title: str
    args: tuple[str, ...]  # msmoe arguments
    nproc_per_node: int


def point_runs(points: list[ClusterPoint], spec: ClusterSweepSpec) -> list[ClusterRun]:
    """Each point as ``msmoe train`` arguments; every config checked here first (named)."""
    from training.config import load_config

    runs = []
    for pt in points:
        over = [*spec.overrides, *pt.overrides(spec.base_p), f"out_dir={spec.run_root}", "eval.untrained=false",
                f"train.steps={spec.steps}", f"train.ckpt_every={10**9}", f"train.log_every={spec.sample_every}"]
        load_config(spec.config, over)
        runs.append(ClusterRun(pt.name, f"weak   world {pt.world}  EP {pt.ep}  {pt.experts} experts",
                               ("train", "--config", spec.config, "--no-progress", "--overwrite", *over),
                               pt.nproc_per_node))
    return runs


def placement_runs(spec: ClusterSweepSpec) -> list[ClusterRun]:
    """The hierarchical grouped model at EP = world, one run per transport."""
    from training.config import load_config

    w = spec.world(spec.placement_nodes)
    runs = []
    for t in TRANSPORTS:
        name = f"{PLACEMENT_PREFIX}-{t}-w{w}-ep{w}"
        over = [f"name={name}", f"out_dir={spec.run_root}", f"train.ep_size={w}", f"train.p={spec.base_p * w}",
                "train.k=2", f"train.steps={spec.steps}", f"train.ckpt_every={10**9}",
                f"train.log_every={spec.sample_every}", f"train.transport={t}", *HIERARCHICAL_SHRINK]
        load_config(HIERARCHICAL_CONFIG, over)
        runs.append(ClusterRun(name, f"placement {t:10s} world {w}  EP {w}  (hierarchical, grouped)",
                               ("train", "--config", HIERARCHICAL_CONFIG, "--no-progress", "--overwrite", *over),
                               spec.nproc_per_node))
    return runs


def cluster_record(spec: ClusterSweepSpec, nodes: int, nproc_per_node: int, mode: str) -> dict:
    """What every point's summary.json gains: the emulated cluster it ran on."""
    return {"nodes": nodes, "nproc_per_node": nproc_per_node, "link_mbit": spec.link_mbit,
            "link": "tbf-shaped veth per node, both ends, through a switch namespace", "switch": mode,
            "host_cores": os.cpu_count()}


def _prepare_data(spec: ClusterSweepSpec) -> None:
    """The synthetic sets, made once here rather than by every node's first rank at once."""
    from reid.synth import ensure_synth
    from training.config import load_config

    cfgs = [load_config(spec.config, list(spec.overrides))]
    if spec.placement_nodes:
        cfgs.append(load_config(HIERARCHICAL_CONFIG, list(HIERARCHICAL_SHRINK)))
    for cfg in cfgs:
        ensure_synth(cfg.data.path, cfg.data.synth_spec(), field="data.path")


def _train(net, spec: ClusterSweepSpec, run: ClusterRun, target: Target) -> dict:
    from cluster.agents import Agents, AgentsFailed, AgentSpec

    logs = os.path.join(spec.run_root, "logs", run.name)
    agent = AgentSpec(run.nproc_per_node, tuple(target(run.args)), rdzv_id=f"msmoe-{run.name}",
                      env={"OMP_NUM_THREADS": "1"})
    try:
        with Agents(net, agent, logs) as agents:
            agents.wait(spec.timeout_s)
    except AgentsFailed as exc:
        raise ScaleError(f"scale point {run.name} failed on the emulated cluster ({net.nodes} nodes): "
                         f"{str(exc).splitlines()[0]} (the nodes' logs: {logs}/node<i>.log)") from None
    path = os.path.join(spec.run_root, run.name, "summary.json")
    with open(path) as fh:
        summary = json.load(fh)
    summary["cluster"] = cluster_record(spec, net.nodes, run.nproc_per_node, net.mode)
    with open(path, "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


def _sigterm_as_exit(signum, frame):  # so that the with-blocks kill the agents and delete the namespaces
    raise SystemExit(128 + signum)


def run_cluster(spec: ClusterSweepSpec, target: Target) -> tuple[list[dict], list[dict]]:
    """Every point on its emulated cluster; -> (points, placement points) as JSON line records,
    written to ``<run_root>/points.jsonl`` and ``placement.jsonl``."""
    import signal

    from cluster import netns

    check_spec(spec)
    check_here()
    by_nodes = plan(spec)
    jobs = [(m, point_runs(pts, spec)) for m, pts in by_nodes.items()]
    if spec.placement_nodes:
        jobs.append((spec.placement_nodes, placement_runs(spec)))
    _prepare_data(spec)
    netns.cleanup_stale()
    total, i = sum(len(r) for _, r in jobs), 0
    previous = signal.signal(signal.SIGTERM, _sigterm_as_exit)
    try:
        for m, runs in jobs:
            with netns.EmulatedCluster(m, spec.link_mbit) as net:
                for run in runs:
                    i += 1
                    print(f"[{i}/{total}] {m} node(s) x {run.nproc_per_node}, {spec.link_mbit:g} Mbit/s links: "
                          f"{run.title}", flush=True)
                    s = _train(net, spec, run, target)
                    cross = s["a2a_bytes_per_step"].get("cross_node")
                    print(f"      step {s['step_time_ms']['step']:7.1f} ms   cross-node "
                          f"{'-' if cross is None else f'{cross / 1e3:.1f} kB'}/step", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return collect(spec.run_root)


def collect(run_root: str, env: dict | None = None) -> tuple[list[dict], list[dict]]:
    """The summaries under ``run_root`` -> (points.jsonl, placement.jsonl) records, both written there."""
    env = env or environment()
    out = []
    for prefix, file in ((POINT_PREFIX, "points.jsonl"), (PLACEMENT_PREFIX, "placement.jsonl")):
        recs = []
        for p in sorted(glob.glob(os.path.join(run_root, f"{prefix}-*", "summary.json"))):
            with open(p) as fh:
                rec = point_record(json.load(fh), "weak" if prefix == POINT_PREFIX else "placement")
            rec["env"] = env
            recs.append(rec)
        recs.sort(key=lambda r: (r.get("nodes") or 0, r["world_size"], r["ep_size"], r.get("transport") or ""))
        with open(os.path.join(run_root, file), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in recs)
        out.append(recs)
    return out[0], out[1]

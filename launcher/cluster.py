"""``msmoe cluster`` (``make cluster``): one config trained on an emulated multi-node cluster on this
machine, once per transport, and the runs' cross-node traffic and step time side by side.

  msmoe cluster                                    # 2 nodes x 2 processes, 200 Mbit/s links, EP=4,
                                                   #   configs/hierarchical.yaml shrunk: flat, then node_local
  msmoe cluster --nodes 4 --rate-mbit 100 --transports flat train.steps=40

Each node is a network namespace behind a switch namespace, its link shaped with tbf
(cluster/netns.py); one real torchrun agent per node, c10d rendezvous on node 0 (cluster/agents.py).
Run ``<transport>`` goes to ``<out-dir>/cluster-<transport>`` (summary.json, report.md), the agents'
logs to ``<out-dir>/cluster-logs/<transport>/node<i>.log``. The namespaces are deleted afterwards,
also on failure or Ctrl-C. Needs root (network namespaces, tc).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from dataclasses import dataclass

from common.errors import UserError
from launcher.command import msmoe_target

DEFAULT_CONFIG = "configs/hierarchical.yaml"
TRANSPORTS = ("flat", "node_local")
# configs/hierarchical.yaml at a size that trains in well under a minute per run on 2 cores: a small
# synthetic set; the model and the patches' payload stay the default's (dim 64, 8 patches per image).
# Groups of 6, 3 and 3 experts: at EP=4 on 2 nodes x 2 a node holds 6 experts, so every group sits on
# one node, as node_local needs (its 4, 4, 4 would split group 1 over both nodes); both runs use them.
SHRINK = ("data.path=data_cache/synth_cluster", "model.hierarchical.experts_per_group=[6,3,3]",
          "model.hierarchical.fine.num_experts=6",
          "data.synth={num_train_ids: 32, num_test_ids: 8, num_cameras: 3, images_per_camera: 3, height: 128, width: 64}",
          "train.steps=20", "train.warmup_steps=5", "train.log_every=5", "train.ckpt_every=20", "eval.untrained=false")


class ClusterError(UserError, RuntimeError):
    """``msmoe cluster`` cannot run here; the message names the reason and the fix."""


@dataclass(frozen=True)
class ClusterRun:
    config: str = DEFAULT_CONFIG
    nodes: int = 2
    nproc_per_node: int = 2
    rate_mbit: float = 200.0
    ep_size: int = 4
    out_dir: str = "runs"
    transports: tuple[str, ...] = TRANSPORTS
    overrides: tuple[str, ...] = ()
    timeout_s: float = 900.0

    def run_name(self, transport: str) -> str:
        return f"cluster-{transport}"

    def config_overrides(self, transport: str, with_transport_key: bool) -> list[str]:
        out = [f"name={self.run_name(transport)}", f"out_dir={self.out_dir}", f"train.ep_size={self.ep_size}", *SHRINK,
               *self.overrides]
        return out + ([f"train.transport={transport}"] if with_transport_key else [])

    def train_args(self, transport: str, with_transport_key: bool) -> list[str]:
        return ["train", "--config", self.config, "--no-progress", "--overwrite",
                *self.config_overrides(transport, with_transport_key)]


def add_parser(sub) -> None:
    c = sub.add_parser("cluster", help="train on an emulated multi-node cluster (network namespaces), per transport",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--config", default=DEFAULT_CONFIG, help="run config (shrunk by the command's overrides)")
    c.add_argument("--nodes", type=int, default=2, help="emulated nodes (1-9)")
    c.add_argument("--nproc-per-node", type=int, default=2, help="processes per node")
    c.add_argument("--rate-mbit", type=float, default=200.0, help="each node link's tbf rate, Mbit/s")
    c.add_argument("--ep-size", type=int, default=4, help="train.ep_size of every run")
    c.add_argument("--out-dir", default="runs", help="where runs/cluster-<transport> go")
    c.add_argument("--transports", default=",".join(TRANSPORTS), help="comma-separated: flat, node_local")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides on top, e.g. train.steps=40")
    c.set_defaults(func=run)


def parse_spec(args) -> ClusterRun:
    transports = tuple(t.strip() for t in args.transports.split(",") if t.strip())
    bad = [t for t in transports if t not in TRANSPORTS]
    if bad or not transports:
        raise ClusterError(f"--transports {args.transports!r}: each must be one of {list(TRANSPORTS)}")
    if not 1 <= args.nodes <= 9:
        raise ClusterError(f"--nodes {args.nodes}: between 1 and 9 emulated nodes (node ranks follow the addresses "
                           "10.79.0.1-9)")
    if args.nproc_per_node < 1 or args.rate_mbit <= 0:
        raise ClusterError(f"--nproc-per-node {args.nproc_per_node} must be >= 1 and --rate-mbit {args.rate_mbit} > 0")
    return ClusterRun(config=args.config, nodes=args.nodes, nproc_per_node=args.nproc_per_node,
                      rate_mbit=args.rate_mbit, ep_size=args.ep_size, out_dir=args.out_dir, transports=transports,
                      overrides=tuple(args.overrides))


def has_transport_key() -> bool:
    from training.config import TrainConfig

    return "transport" in {f.name for f in dataclasses.fields(TrainConfig)}


def check_here() -> None:
    from cluster import netns

    why = netns.available()
    if why:
        raise ClusterError(f"msmoe cluster builds network namespaces and shapes links with tc, which {why}; "
                           "run it as root (sudo make cluster) on a machine with iproute2")


def _prepare_data(spec: ClusterRun) -> None:
    """The synthetic set, made once here rather than by every node's first rank at once."""
    from reid.synth import ensure_synth
    from training.config import load_config

    cfg = load_config(spec.config, spec.config_overrides("flat", False))
    ensure_synth(cfg.data.path, cfg.data.synth_spec(), field="data.path")


def _train_on(net, spec: ClusterRun, transport: str, with_key: bool) -> dict:
    from cluster.agents import Agents, AgentSpec

    logs = os.path.join(spec.out_dir, "cluster-logs", transport)
    agent = AgentSpec(spec.nproc_per_node, tuple(msmoe_target(spec.train_args(transport, with_key))),
                      rdzv_id=f"msmoe-{spec.run_name(transport)}", env={"OMP_NUM_THREADS": "1"})
    print(f"cluster: training {spec.run_name(transport)} on {spec.nodes} nodes x {spec.nproc_per_node} processes "
          f"(logs: {logs}/node<i>.log)", flush=True)
    with Agents(net, agent, logs) as agents:
        agents.wait(spec.timeout_s)
    with open(os.path.join(spec.out_dir, spec.run_name(transport), "summary.json")) as fh:
        return json.load(fh)


def summary_line(transport: str, s: dict) -> str:
    cross = s["a2a_bytes_per_step"].get("cross_node")
    cross_text = f"{cross / 1e6:.3f} MB" if cross is not None else "n/a (summary.json has no cross_node)"
    return (f"  {transport:<10}  nodes {s.get('nodes', '?')}  world {s['world_size']}  EP {s['ep_size']}  "
            f"transport {s.get('transport', 'flat')}  cross-node all-to-all {cross_text}/step  step {s['step_time_ms']['step']:.1f} ms  "
            f"{s['samples_per_s']:.1f} samples/s  final loss {s['final_loss']:.4f}")


def _sigterm_as_exit(signum, frame):  # so that the with-blocks kill the agents and delete the namespaces
    raise SystemExit(128 + signum)


def run(args) -> int:
    from cluster import netns

    spec = parse_spec(args)
    check_here()
    with_key = has_transport_key()
    transports = [t for t in spec.transports if with_key or t == "flat"]
    if len(transports) < len(spec.transports):
        print("cluster: this build has no train.transport key: node_local left out, flat runs the one-stage exchange",
              flush=True)
    _prepare_data(spec)
    netns.cleanup_stale()
    previous = signal.signal(signal.SIGTERM, _sigterm_as_exit)
    summaries = {}
    from cluster.agents import AgentsFailed

    try:
        with netns.EmulatedCluster(spec.nodes, spec.rate_mbit) as net:
            print(f"cluster: {spec.nodes} emulated nodes ({net.mode} switch), links shaped to {spec.rate_mbit:g} "
                  "Mbit/s", flush=True)
            for transport in transports:
                summaries[transport] = _train_on(net, spec, transport, with_key)
    except AgentsFailed as exc:  # a run failed on a node: say which, point at its log (namespaces already gone)
        print(f"cluster: error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"cluster: namespaces removed; {spec.config} at EP={spec.ep_size}, {spec.rate_mbit:g} Mbit/s node links:")
    for transport, s in summaries.items():
        print(summary_line(transport, s))
        print(f"    {os.path.join(spec.out_dir, spec.run_name(transport), 'summary.json')}")
    return 0

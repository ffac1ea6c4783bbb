"""What ``overlap_chunks`` buys where the link is the bottleneck: one expert-parallel PatchMoE layer
(expert choice, a static plan), forward + backward, timed at overlap_chunks 1, 2 and 4 on an
emulated cluster of 2 nodes x 1 process whose link is shaped (cluster/netns.py, cluster/agents.py;
needs root).

  python -m bench.overlap --link-mbit 50          # prints one line per chunk count, and the gain

Each round times every chunk count once, in alternation (the machine's drift hits them alike);
the figure is the median over rounds. The worker (``--worker``, started by the agents) builds the
same layer for each chunk count from one seed, so the three compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

CHUNKS = (1, 2, 4)


def _layer(chunks: int, groups, dim: int, hidden: int, experts: int):
    import torch

    from moe import ExpertConfig, PatchMoE, PatchMoEConfig, RouterConfig
    from parallel.dispatcher import build_dispatcher

    torch.manual_seed(0)
    cfg = PatchMoEConfig(dim=dim, patch_size=4, overlap_chunks=chunks,
                         router=RouterConfig(num_experts=experts, top_k=2, choice="expert"),
                         expert=ExpertConfig(kind="ffn", hidden_dim=hidden, dropout=0.0))
    return PatchMoE(cfg, dispatcher=build_dispatcher(groups))


def worker(args) -> None:
    import torch

    from parallel.dist import init_distributed
    from parallel.groups import ParallelGroups

    world = init_distributed()
    groups = ParallelGroups.build(world.world_size, args.experts)
    layers = {n: _layer(n, groups, args.dim, args.hidden, args.experts) for n in CHUNKS}
    x = torch.randn(args.batch, 32, 32, args.dim, generator=torch.Generator().manual_seed(world.rank))
    times = {n: [] for n in CHUNKS}
    for r in range(args.warmup + args.rounds):
        for n, layer in layers.items():
            torch.distributed.barrier()
            t0 = time.perf_counter()
            layer(x.clone().requires_grad_()).out.square().mean().backward()
            torch.distributed.barrier()
            if r >= args.warmup:
                times[n].append(1e3 * (time.perf_counter() - t0))
            layer.zero_grad(set_to_none=True)
    if world.rank == 0:
        with open(args.out, "w") as fh:
            json.dump({str(n): t for n, t in times.items()}, fh)


def drive(args) -> int:
    from cluster import netns
    from cluster.agents import Agents, AgentSpec

    why = netns.available()
    if why:
        print(f"bench.overlap: the emulated cluster is unavailable here: {why}", file=sys.stderr)
        return 2
    netns.cleanup_stale()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        target = ("-m", "bench.overlap", "--worker", "--out", out, "--rounds", str(args.rounds),
                  "--warmup", str(args.warmup), "--batch", str(args.batch), "--dim", str(args.dim),
                  "--hidden", str(args.hidden), "--experts", str(args.experts))
        with netns.EmulatedCluster(2, args.link_mbit or None) as net, \
                Agents(net, AgentSpec(1, target), log_dir=tmp, cwd=os.getcwd()) as agents:
            agents.wait(timeout_s=900)
        times = {int(k): v for k, v in json.load(open(out)).items()}
    med = {n: statistics.median(t) for n, t in times.items()}
    link = f"link {args.link_mbit:g} Mbit/s" if args.link_mbit else "link unshaped"
    print(f"overlap_chunks on 2 emulated nodes x 1 process, {link}; PatchMoE EP=2, expert "
          f"choice, B={args.batch} 32x32 C={args.dim} F={args.hidden} E={args.experts} K=2 P=4; fwd+bwd, median of "
          f"{args.rounds} rounds")
    for n in CHUNKS:
        print(f"  overlap_chunks={n}: {med[n]:8.1f} ms   ({med[1] / med[n]:.2f}x of 1 chunk)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--link-mbit", type=float, default=50.0, help="the node link's rate (0: unshaped)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())

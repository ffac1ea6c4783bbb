"""Worker (run under torchrun): expert-parallel HierarchicalMoE vs the single-process layer.

G=3 groups (modalities) x F=4 fine experts = 12 experts (or --sizes 4,2,2: groups of different
sizes), sharded over the EP group. Every rank
builds the full layer (same seed); each shard goes through it alone; outputs, input grads, router
grads and (after the expert-data-parallel sum) expert grads must match. Writes rank<r>.json.
"""

import argparse

import torch
import torch.distributed as dist

from harness import finish, init_world, write_result
from moe import ExpertConfig, HierarchicalMoE, HierarchicalMoEConfig, RouterConfig
from moe.hierarchical import OneStage
from parallel.all_to_all import CommCounter
from parallel.dispatcher import AllToAllDispatcher
from parallel.groups import ParallelGroups
from parallel.node_transport import NodeTransport, build_node_groups

C, P = 8, 4
G, F = 3, 4  # defaults; --groups/--fine change them


def shard(r):
    g = torch.Generator().manual_seed(200 + r)
    b = [2, 1, 3, 0][r % 4]
    x = torch.randn(b, 8, 8 + 4 * (r % 2), C, generator=g)
    return x, torch.randn(x.shape, generator=g), torch.randint(0, G, (b,), generator=g)


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep-size", type=int, required=True)
    ap.add_argument("--mode", default="learned")
    ap.add_argument("--placement", default="grouped")
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--fine", type=int, default=4)
    ap.add_argument("--sizes", default="", help="unequal groups: comma-separated sizes (overrides --groups/--fine)")
    ap.add_argument("--node-size", type=int, default=0, help="two-stage node transport with this many ranks per node")
    ap.add_argument("--out", required=True)
    return ap.parse_args()


def build_layers(args, groups, sizes):
    """-> (config, the full reference layer, the all-to-all dispatcher, the expert-parallel layer, and
    with --node-size its node transport and a one-stage layer beside it (else None, None)), every
    layer holding the reference's weights (this rank's slice of the experts)."""
    cfg = HierarchicalMoEConfig(
        dim=C, patch_size=P, num_groups=G, experts_per_group=sizes if args.sizes else F, coarse_mode=args.mode,
        placement=args.placement,
        coarse=RouterConfig(num_experts=G, top_k=2 if args.mode == "learned" else 1),
        fine=RouterConfig(num_experts=max(sizes), top_k=2), expert=ExpertConfig(kind="ffn", hidden_dim=16, dropout=0.0))
    torch.manual_seed(0)
    ref = HierarchicalMoE(cfg)
    ns = args.node_size
    disp = AllToAllDispatcher(groups.ep, CommCounter(node_size=ns))
    transport = single = None
    if ns:
        transport = NodeTransport(sizes, groups.ep, build_node_groups(groups.ep_group, ns), ns)
        layer = HierarchicalMoE(cfg, dispatcher=transport)
        single = HierarchicalMoE(cfg, dispatcher=OneStage(disp, sum(sizes)))  # one-stage, for the byte comparison
    else:
        layer = HierarchicalMoE(cfg, dispatcher=OneStage(disp, sum(sizes)))
    first, el = disp.first_expert, disp.num_local_experts
    with torch.no_grad():
        for target in ([layer, single] if ns else [layer]):
            for name, p in target.named_parameters():
                src = ref.get_parameter(name)
                p.copy_(src[first:first + el] if name.startswith("experts.") else src)
    return cfg, ref, disp, layer, transport, single


def run_reference(args, ref, rank, ws):
    """Every shard through the full layer alone -> (expert grads summed over the world, this rank's
    own reference: output, input grad, router grads, load)."""
    sum_all = {n: torch.zeros_like(p) for n, p in ref.experts.named_parameters()}
    for r in range(ws):
        xr, gr, mr = shard(r)
        xr = xr.requires_grad_()
        ref.zero_grad(set_to_none=False)
        out = ref(xr, mr if args.mode == "given" else None)
        (out.out * gr).sum().backward()
        for n, p in ref.experts.named_parameters():
            sum_all[n] += p.grad
        if r == rank:
            own = {"out": out.out.detach(), "x_grad": xr.grad, "load": out.stats.load.tolist(),
                   "router": {n: p.grad.clone() for n, p in ref.named_parameters() if not n.startswith("experts.")}}
    return sum_all, own


def err(a, b):
    return float((a - b).abs().max() / (b.abs().max() + 1e-6)) if a.numel() else 0.0


def node_report(args, cfg, x, g, mod, res, own, disp, transport, single):
    """--node-size: the one-stage layer on the same patches, and the bytes each stage moved."""
    s_res = single(x.detach().requires_grad_(), mod if args.mode == "given" else None)
    (s_res.out * g).sum().backward()
    return dict(
        single_out_err=err(s_res.out, own["out"]),
        coarse_cross=transport.coarse_counter.cross_node_bytes, fine_cross=transport.fine_counter.cross_node_bytes,
        fine_total=transport.fine_counter.total_bytes, fine_offrank=transport.fine_counter.offrank_bytes,
        coarse_total=transport.coarse_counter.total_bytes,
        single_cross=disp.counter.cross_node_bytes, single_total=disp.counter.total_bytes,
        coarse_slots=int(res.stats.num_units) * cfg.coarse.top_k if args.mode == "learned" else int(res.stats.num_units),
    )


def main():
    args = parse_args()
    global G, F
    G, F = args.groups, args.fine
    sizes = tuple(int(v) for v in args.sizes.split(",")) if args.sizes else (F,) * G
    G = len(sizes)
    world = init_world()
    groups = ParallelGroups.build(args.ep_size, sum(sizes))
    rank, ws = world.rank, world.world_size
    cfg, ref, disp, layer, transport, single = build_layers(args, groups, sizes)
    first, el = disp.first_expert, disp.num_local_experts

    x, g, mod = shard(rank)
    x = x.requires_grad_()
    res = layer(x, mod if args.mode == "given" else None)
    (res.out * g).sum().backward()
    sum_all, own = run_reference(args, ref, rank, ws)
    for p in layer.experts.parameters():
        dist.all_reduce(p.grad, group=groups.edp_group)

    errors = {
        "out": err(res.out, own["out"]), "x_grad": err(x.grad, own["x_grad"]),
        "router_grad": max(err(p.grad, own["router"][n]) for n, p in layer.named_parameters()
                           if not n.startswith("experts.")),
        "expert_grad": max(err(p.grad, sum_all[n][first:first + el]) for n, p in layer.experts.named_parameters()),
    }
    report = {"rank": rank, "ep_size": groups.ep_size, "errors": errors, "load": res.stats.load.tolist(),
              "ref_load": own["load"], "bytes_forward": disp.counter.by_direction["forward"],
              "analytic_forward": 2 * int(res.stats.load.sum()) * P * P * C * 4}
    if args.node_size:
        report.update(node_report(args, cfg, x, g, mod, res, own, disp, transport, single))
    write_result(args.out, rank, report)
    dist.barrier()


if __name__ == "__main__":
    main()
    finish()

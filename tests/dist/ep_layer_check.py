"""Worker (run under torchrun): expert-parallel PatchMoE vs the single-process reference.

Every rank builds the same full reference layer (all E experts, same seed), routes every
rank's shard through it one shard at a time, and compares with what the expert-parallel layer
produced: outputs, input gradients, gate gradients, and the local experts' gradients, both
summed over the EP group (straight from the all-to-all backward) and over the whole world
(after the expert-data-parallel all-reduce). Writes <out>/rank<r>.json with the max errors.
"""

import argparse
import os

import torch
import torch.distributed as dist

from harness import finish, init_world, write_result
from moe import ExpertConfig, LocalDispatcher, PatchMoE, PatchMoEConfig, RouterConfig
from moe.dispatch import expert_capacity
from parallel.dispatcher import AllToAllDispatcher
from parallel.groups import ParallelGroups

E, K, C, P = 8, 2, 8, 4


class FixedCapacity(LocalDispatcher):
    def __init__(self, num_experts, cap):
        super().__init__(num_experts)
        self.cap = cap

    def capacity(self, num_units, k, num_experts, factor):
        return self.cap


UNIFORM = False  # --uniform: every rank's shard the same shape (the static plans' promise)


def shard_shape(r):  # uneven on purpose; the 4th rank has no patches at all
    if UNIFORM:
        return (2, 8, 12, C)
    return ([2, 1, 3, 0][r % 4], 8 + 2 * (r % 3), 12 - r % 4, C)


def shard(r, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + r)
    return torch.randn(shard_shape(r), generator=g).to(dtype), torch.randn(shard_shape(r), generator=g).to(dtype)


def bias_for(r):  # rank 0 never routes to expert E-1; others unbiased
    b = torch.zeros(E)
    if r == 0:
        b[E - 1] = -10.0
    return b


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep-size", type=int, required=True)
    ap.add_argument("--capacity-factor", type=float, default=None)
    ap.add_argument("--kind", default="seed")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--top-p", type=float, default=None, help="dynamic top-p routing (k in 1..4)")
    ap.add_argument("--keep-fraction", type=float, default=1.0, help="dual-sparsity patch pruning")
    ap.add_argument("--choice", choices=["token", "expert"], default="token", help="router.choice")
    ap.add_argument("--overlap-chunks", type=int, default=1, help="model.patch_moe.overlap_chunks")
    ap.add_argument("--uniform", action="store_true",
                    help="equal shards and a dispatcher told so (uniform_units): static plans skip the count exchange")
    ap.add_argument("--out", required=True)
    return ap.parse_args()


def build_layers(args, groups, rank, dtype):
    """-> (config, the full reference layer, the all-to-all dispatcher, the expert-parallel layer with
    the reference's weights: its router and scorer, and this rank's slice of the experts)."""
    cfg = PatchMoEConfig(
        dim=C, patch_size=P, capacity_factor=args.capacity_factor,
        router=RouterConfig(num_experts=E, top_k=K, dynamic_top_p=args.top_p, k_min=1, k_max=4, choice=args.choice),
        expert=ExpertConfig(kind=args.kind, hidden_dim=16, dropout=0.0),
        keep_fraction=args.keep_fraction, overlap_chunks=args.overlap_chunks,
    )
    torch.manual_seed(0)
    ref = PatchMoE(cfg).to(dtype)
    disp = AllToAllDispatcher(groups.ep, uniform_units=args.uniform)
    layer = PatchMoE(cfg, dispatcher=disp).to(dtype)
    first, el = disp.first_expert, disp.num_local_experts
    with torch.no_grad():
        for name, p in layer.named_parameters():  # router and scorer; experts below
            if not name.startswith("experts."):
                p.copy_(ref.get_parameter(name))
        layer.router.selection_bias.copy_(bias_for(rank))
        for name, p in layer.experts.named_parameters():
            p.copy_(getattr(ref.experts, name)[first:first + el])
    return cfg, ref, disp, layer


def run_expert_parallel(layer, rank, dtype):
    """The expert-parallel run on this rank's shard -> (its input, the layer's result, the local experts' grads)."""
    x, g = shard(rank, dtype)
    x = x.requires_grad_()
    res = layer(x)
    (res.out * g).sum().backward()
    return x, res, {n: p.grad.clone() for n, p in layer.experts.named_parameters()}


def group_of(r, ws, ep_size):
    return [q for q in range(ws) if q // ep_size == r // ep_size]


def capacity_of(r, args, ws, kmax):  # the capacity r's EP group agrees on: from its largest shard
    if args.capacity_factor is None:
        return None
    n_max = max(shard_shape(q)[0] * -(-shard_shape(q)[1] // P) * -(-shard_shape(q)[2] // P)
                for q in group_of(r, ws, args.ep_size))
    n_max = n_max if args.keep_fraction == 1 else max(
        shard_shape(q)[0] * round(args.keep_fraction * -(-shard_shape(q)[1] // P) * -(-shard_shape(q)[2] // P))
        for q in group_of(r, ws, args.ep_size))
    return expert_capacity(n_max, kmax, E, args.capacity_factor)


def run_reference(args, ref, rank, ws, dtype, kmax):
    """Every shard through the full layer, one at a time -> (expert grads summed over this rank's EP
    group, summed over the world, this rank's own reference: output, input grad, stats, gate and scorer grads)."""
    ep_ranks = group_of(rank, ws, args.ep_size)
    sum_ep = {n: torch.zeros_like(p) for n, p in ref.experts.named_parameters()}
    sum_all = {n: torch.zeros_like(p) for n, p in ref.experts.named_parameters()}
    for r in range(ws):
        xr, gr = shard(r, dtype)
        xr = xr.requires_grad_()
        ref.zero_grad(set_to_none=False)
        ref.dispatcher = FixedCapacity(E, capacity_of(r, args, ws, kmax))
        with torch.no_grad():
            ref.router.selection_bias.copy_(bias_for(r))
        out = ref(xr)
        (out.out * gr).sum().backward()
        for n, p in ref.experts.named_parameters():
            sum_all[n] += p.grad
            if r in ep_ranks:
                sum_ep[n] += p.grad
        if r == rank:
            own = {"out": out.out.detach(), "x_grad": xr.grad, "stats": out.stats,
                   "gate": {n: p.grad.clone() for n, p in ref.router.named_parameters()},
                   "scorer": ({n: p.grad.clone() for n, p in ref.scorer.named_parameters()}
                              if ref.scorer is not None else {})}
    return sum_ep, sum_all, own


def err(a, b):
    return float((a - b).float().abs().max() / (b.float().abs().max() + 1e-6)) if a.numel() else 0.0  # relative


def compare(layer, disp, groups, x, res, ep_expert_grads, sum_ep, sum_all, own):
    """The max relative errors of the expert-parallel run against the reference; all-reduces the
    expert grads over the expert-data-parallel group on the way (what DeepSpeed's engine does)."""
    first, el = disp.first_expert, disp.num_local_experts
    errors = {
        "out": err(res.out, own["out"]),
        "x_grad": err(x.grad, own["x_grad"]),
        "gate_grad": max(err(p.grad, own["gate"][n]) for n, p in layer.router.named_parameters()),
        **({"scorer_grad": max(err(p.grad, own["scorer"][n]) for n, p in layer.scorer.named_parameters())}
           if layer.scorer is not None else {}),
        "expert_grad_ep": max(err(ep_expert_grads[n], sum_ep[n][first:first + el]) for n in sum_ep),
    }
    for p in layer.experts.parameters():  # what DeepSpeed's engine does for expert grads
        dist.all_reduce(p.grad, group=groups.edp_group)
    errors["expert_grad_world"] = max(
        err(p.grad, sum_all[n][first:first + el]) for n, p in layer.experts.named_parameters()
    )
    return errors


def report_of(rank, groups, disp, res, own, errors, cap, dtype):
    kept_rows = int(res.stats.kept.sum())
    row_bytes = P * P * C * torch.finfo(dtype).bits // 8
    return {
        "rank": rank, "ep_size": groups.ep_size, "edp_size": groups.edp_size, "errors": errors,
        "num_units": res.stats.num_units, "load": res.stats.load.tolist(), "kept": res.stats.kept.tolist(),
        "ref_load": own["stats"].load.tolist(), "ref_kept": own["stats"].kept.tolist(),
        "dropped_fraction": float(res.stats.dropped_fraction),
        "bytes_forward": disp.counter.by_direction["forward"],
        "bytes_backward": disp.counter.by_direction["backward"],
        "analytic_forward": 2 * kept_rows * row_bytes,  # dispatch + combine of every kept slot
        "analytic_dropless": 2 * int(res.stats.load.sum()) * row_bytes,  # every live slot, dispatched + combined
        "analytic_topk": 2 * K * res.stats.num_units * row_bytes,
        "pruned_units": res.stats.pruned_units,
        "active_experts": float(res.stats.active_experts),
        "capacity": cap,
        "coverage": res.stats.coverage.tolist() if res.stats.coverage is not None else None,
        "ref_coverage": own["stats"].coverage.tolist() if own["stats"].coverage is not None else None,
    }


def main():
    global UNIFORM
    args = parse_args()
    UNIFORM = args.uniform
    world = init_world()
    groups = ParallelGroups.build(args.ep_size, E)
    rank, ws = world.rank, world.world_size
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg, ref, disp, layer = build_layers(args, groups, rank, dtype)
    kmax = cfg.router.max_k
    from common.compat import grouped_mm_available
    from gpucheck.host_syncs import SyncCounter

    grouped_mm_available(torch.device("cpu"), dtype)  # the one-time capability probe (cached), outside the count
    with SyncCounter() as syncs:
        x, res, ep_expert_grads = run_expert_parallel(layer, rank, dtype)
    cap = capacity_of(rank, args, ws, kmax)
    sum_ep, sum_all, own = run_reference(args, ref, rank, ws, dtype, kmax)
    errors = compare(layer, disp, groups, x, res, ep_expert_grads, sum_ep, sum_all, own)
    os.makedirs(args.out, exist_ok=True)
    torch.save({"out": res.out.detach(), "x_grad": x.grad, "experts": ep_expert_grads},
               f"{args.out}/tensors_rank{rank}.pt")
    write_result(args.out, rank, {**report_of(rank, groups, disp, res, own, errors, cap, dtype),
                                  "host_syncs": syncs.total, "sync_sites": syncs.report()})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    finish()

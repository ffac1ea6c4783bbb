"""Worker (two torchrun agents of 2 processes: 2 nodes, LOCAL_WORLD_SIZE=2): the same sharded model
trained with the flat and with the node-local transport (parallel/transport.py).

A TinyNet (tests/dist/ds_train_check.py) whose MoE is a HierarchicalMoE of groups (4, 2, 2), 8 experts,
grouped placement, learned coarse top-2 and fine top-2, built as the trainer builds it (experts on
meta, ``shard_moe_layers`` with the run's transport) at EP=4 over the 4 ranks: group 0 lives on node
0, groups 1 and 2 on node 1. Each transport trains the same steps on the same global batches in a
DeepSpeed engine. Rank r writes both runs' losses, its final weights (experts gathered over the EP
group, dense), the cross-node bytes of its counter, and the refusals seen on this real layout.
"""

import argparse

import torch
import torch.distributed as dist

from ds_train_check import C, P, TinyNet, train_step
from harness import finish, init_world, write_result
from moe import ExpertConfig, HierarchicalMoE, HierarchicalMoEConfig, RouterConfig
from moe.experts import experts_on_meta
from parallel.ds_moe import shard_moe_layers
from parallel.engine import build_engine
from parallel.groups import ParallelGroups
from parallel.launchenv import node_size
from parallel.transport import Transport, TransportError, hierarchical_dispatcher

SIZES = (4, 2, 2)
GLOBAL_B = 8


def config(sizes=SIZES, placement="grouped"):
    return HierarchicalMoEConfig(
        dim=C, patch_size=P, num_groups=len(sizes), experts_per_group=sizes, placement=placement,
        coarse=RouterConfig(num_experts=len(sizes), top_k=2), fine=RouterConfig(num_experts=max(sizes), top_k=2),
        expert=ExpertConfig(kind="ffn", hidden_dim=16, dropout=0.0))


def train(groups, transport, world, steps):
    """-> (losses, counter, engine): the sharded model trained ``steps`` steps with ``transport``."""
    counter = transport.counter()
    torch.manual_seed(0)  # the same model for both transports (experts from their layer seed)
    with experts_on_meta():
        model = TinyNet(HierarchicalMoE(config()))
    shard_moe_layers(model, groups, counter, None, transport)
    ds_config = {"train_micro_batch_size_per_gpu": GLOBAL_B // world.world_size, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 0}, "gradient_clipping": 1.0, "steps_per_print": 10**9}
    me = build_engine(model, groups, ds_config, lambda pg: torch.optim.AdamW(pg, lr=1e-2))
    losses = [train_step(me, s, world.rank, world.world_size) for s in range(steps)]
    return losses, counter, me


def final_weights(me, groups) -> dict:
    """Every expert (gathered over the EP group, global order) and every dense parameter."""
    model = me.engine.module
    out = {}
    for name, p in model.moe.deepspeed_moe.experts.named_parameters():
        parts = [torch.zeros_like(p) for _ in range(groups.ep_size)]
        dist.all_gather(parts, p.detach().contiguous(), group=groups.ep_group)
        out[f"experts.{name}"] = torch.cat(parts)
    for name, p in model.named_parameters():
        if ".experts." not in name:
            out[name] = p.detach().clone()
    return out


def refusals(world, ns) -> dict:
    """What node_local refuses on this real 2 x 2 layout, on every rank alike (TransportError text)."""
    seen = {}
    try:
        Transport.build("node_local", ParallelGroups.build(1, 8), ns, world.local_rank)  # EP=1 inside a node
    except TransportError as exc:
        seen["ep_not_whole_nodes"] = str(exc)
    groups = ParallelGroups.build(4, 8)
    nl = Transport.build("node_local", groups, ns, world.local_rank)
    for case, cfg in (("group_spans_nodes", config((3, 3, 2))), ("spread", config(placement="spread"))):
        try:
            hierarchical_dispatcher(nl, cfg, groups.ep)
        except TransportError as exc:
            seen[case] = str(exc)
    return seen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    world = init_world()
    ns = node_size(world.world_size)
    groups = ParallelGroups.build(4, sum(SIZES))
    runs = {}
    for kind in ("flat", "node_local"):  # every rank builds the same groups in the same order
        transport = Transport.build(kind, groups, ns, world.local_rank)
        losses, counter, me = train(groups, transport, world, args.steps)
        cross = torch.tensor([counter.cross_node_bytes], dtype=torch.float64)
        dist.all_reduce(cross)
        runs[kind] = {"losses": losses, "cross_node": counter.cross_node_bytes, "cross_node_world": float(cross),
                      "offrank": counter.offrank_bytes, "nodes": transport.nodes, "node_size": transport.node_size,
                      "dispatcher": type(me.engine.module.moe.deepspeed_moe.dispatcher).__name__,
                      "weights": final_weights(me, groups)}
    a, b = runs["flat"].pop("weights"), runs["node_local"].pop("weights")
    diff = {n: float((a[n] - b[n]).abs().max()) for n in a}
    write_result(args.out, world.rank, {"rank": world.rank, "world": world.world_size, "ep_size": groups.ep_size,
                                        "runs": runs, "weight_diff": diff, "weight_names": sorted(a),
                                        "refusals": refusals(world, ns)})
    dist.barrier()


if __name__ == "__main__":
    main()
    finish()

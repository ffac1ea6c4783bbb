"""Worker (run under a launcher): a few DeepSpeed training steps of a small PatchMoE model.

The model and the global batch of every step are the same whatever the expert-parallel size:
experts are built once for all E (seeded), and each rank keeps its slice. Rank 0 writes the
loss curve (mean over ranks), the global norm of each step's gradients, the final per-expert
weight norms (gathered over the EP group) and a checksum of the dense weights of every rank.
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.runtime.utils import clip_grad_norm_ as ds_clip_grad_norm_

from harness import finish, init_world, write_result
from moe import BalanceConfig, ExpertConfig, PatchMoE, PatchMoEConfig, RouterConfig
from parallel.dispatcher import AllToAllDispatcher
from parallel.ds_moe import DeepSpeedMoE
from parallel.engine import build_engine, grad_norm_ep
from parallel.groups import ParallelGroups

E, K, C, P, GLOBAL_B = 4, 2, 8, 4, 8


class TinyNet(nn.Module):
    def __init__(self, moe: nn.Module):
        super().__init__()
        self.stem = nn.Linear(3, C)
        self.moe = moe
        self.head = nn.Linear(C, 5)

    def forward(self, x):
        h = self.stem(x)
        r = self.moe(h)
        return self.head((h + r.out).mean((1, 2))), r.stats.aux_loss


def batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_B, 8, 8, 3, generator=g)
    y = torch.randint(0, 5, (GLOBAL_B,), generator=g)
    per = GLOBAL_B // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def build(groups, world_size, zero=0, clip=0.0, seed=0, load_balance_coef=0.01):
    """The same model for every EP size: all E experts built (seeded), this rank keeps its slice.
    ``load_balance_coef=0``: a loss that does not depend on how the global batch is split (the balance
    loss is computed per rank)."""
    cfg = PatchMoEConfig(dim=C, patch_size=P, router=RouterConfig(num_experts=E, top_k=K),
                         expert=ExpertConfig(kind="seed", hidden_dim=16, dropout=0.0),
                         balance=BalanceConfig(load_balance_coef=load_balance_coef))
    torch.manual_seed(seed)
    full = TinyNet(PatchMoE(cfg))
    disp = AllToAllDispatcher(groups.ep)
    model = TinyNet(DeepSpeedMoE(PatchMoE(cfg, dispatcher=disp), groups))
    first, el = disp.first_expert, disp.num_local_experts
    with torch.no_grad():
        src = full.state_dict()
        for name, t in model.state_dict(keep_vars=True).items():
            if ".experts.deepspeed_experts." in name:
                continue
            t.copy_(src[name.replace("moe.deepspeed_moe.", "moe.")])
        for name, p in model.moe.deepspeed_moe.experts.named_parameters():
            p.copy_(getattr(full.moe.experts, name)[first:first + el])
    ds_config = {
        "train_micro_batch_size_per_gpu": GLOBAL_B // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
    }
    return build_engine(model, groups, ds_config, lambda pg: torch.optim.AdamW(pg, lr=1e-2))


def train_step(moe_engine, step, rank, world_size):
    """One step on the global batch of ``step``; returns the mean loss over ranks."""
    engine = moe_engine.engine
    x, y = batch(step, rank, world_size)
    logits, aux = engine(x)
    loss = nn.functional.cross_entropy(logits, y) + aux
    engine.backward(loss)
    moe_engine.clip_gradients()
    engine.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return float(mean) / world_size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep-size", type=int, required=True)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the deepspeed launcher adds it
    args = ap.parse_args()

    world = init_world()
    groups = ParallelGroups.build(args.ep_size, E)
    moe_engine = build(groups, world.world_size, args.zero, args.clip)
    engine, model, disp = moe_engine.engine, moe_engine.engine.module, moe_engine.engine.module.moe.deepspeed_moe.dispatcher
    el = disp.num_local_experts
    losses, norms, ds_norms = [], [], []
    for step in range(args.steps):
        x, y = batch(step, world.rank, world.world_size)
        logits, aux = engine(x)
        loss = nn.functional.cross_entropy(logits, y) + aux
        engine.backward(loss)
        if args.clip > 0 and args.zero == 0:
            # what DeepSpeed's own ZeRO-0 clipping would use (max_norm huge: it scales nothing)
            ds_norms.append(float(ds_clip_grad_norm_(list(engine.module.parameters()), 1e30)))
        if moe_engine.clips_gradients:  # the global norm msmoe clips by
            norms.append(float(grad_norm_ep(engine.module.parameters(), groups)))
        moe_engine.clip_gradients()
        engine.step()
        if args.clip > 0 and args.zero > 0:
            norms.append(float(engine.get_global_grad_norm()))
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world.world_size)

    experts = model.moe.deepspeed_moe.experts
    local_norms = torch.stack([torch.cat([p[i].flatten() for p in experts.parameters()]).norm()
                               for i in range(el)])
    gathered = [torch.zeros_like(local_norms) for _ in range(groups.ep_size)]
    dist.all_gather(gathered, local_norms, group=groups.ep_group)
    dense = torch.stack([p.detach().double().sum() for n, p in model.named_parameters()
                         if not getattr(p, "allreduce", True) is False])
    all_dense = [torch.zeros_like(dense) for _ in range(world.world_size)]
    dist.all_gather(all_dense, dense)
    report = {
        "rank": world.rank, "world": world.world_size, "launcher": world.launcher, "ep_size": groups.ep_size,
        "zero": args.zero, "losses": losses, "grad_norms": norms, "deepspeed_zero0_norms": ds_norms,
        "expert_norms": torch.cat(gathered).tolist(),
        "dense_spread": float(torch.stack(all_dense).std(0).max()) if world.world_size > 1 else 0.0,
    }
    write_result(args.out, world.rank, report)
    dist.barrier()


if __name__ == "__main__":
    main()
    finish()

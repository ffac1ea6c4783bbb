"""Worker: DeepSpeed checkpoints of an expert-parallel model.

Trains N steps and saves; then builds a differently-initialised model, loads the checkpoint
and trains M more steps. Compared with N+M steps straight, the losses must agree (weights and
optimizer state restored), and the checkpoint must hold one file per *global* expert id whose
tensors are that expert's weights.
"""

import argparse
import glob
import os

import torch
import torch.distributed as dist

from ds_train_check import E, build, train_step
from harness import finish, init_world, write_result
from parallel.groups import ParallelGroups


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep-size", type=int, required=True)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    world = init_world()
    groups = ParallelGroups.build(args.ep_size, E)
    ckpt = os.path.join(args.out, "ckpt")

    straight = build(groups, world.world_size, args.zero)
    straight_losses = [train_step(straight, s, world.rank, world.world_size) for s in range(5)]

    first = build(groups, world.world_size, args.zero)
    for s in range(3):
        train_step(first, s, world.rank, world.world_size)
    first.engine.save_checkpoint(ckpt, tag="step3")
    experts = first.engine.module.moe.deepspeed_moe.experts
    saved_local = {n: p.detach().clone() for n, p in experts.named_parameters()}
    disp = first.engine.module.moe.deepspeed_moe.dispatcher

    # every local expert is in the file of its global id, under its global id
    file_check = []
    for i in range(disp.num_local_experts):
        g = disp.first_expert + i
        path = os.path.join(ckpt, "step3", f"layer_0_expert_{g}_mp_rank_00_model_states.pt")
        sd = torch.load(path, map_location="cpu", weights_only=False)
        sd = sd.get("module", sd)
        for name, local in saved_local.items():
            key = f"moe.deepspeed_moe.experts.deepspeed_experts.{g}.{name}"
            file_check.append(bool(torch.equal(sd[key], local[i])))

    resumed = build(groups, world.world_size, args.zero, seed=123)  # different weights before loading
    resumed.engine.load_checkpoint(ckpt, tag="step3")
    loaded = resumed.engine.module.moe.deepspeed_moe.experts
    weights_equal = all(torch.equal(p, saved_local[n]) for n, p in loaded.named_parameters())
    resumed_losses = [train_step(resumed, s, world.rank, world.world_size) for s in (3, 4)]

    report = {
        "rank": world.rank, "straight": straight_losses, "resumed": resumed_losses,
        "weights_equal": weights_equal, "file_check": file_check,
        "files": sorted(os.path.basename(f) for f in glob.glob(os.path.join(ckpt, "step3", "*"))),
    }
    write_result(args.out, world.rank, report)
    dist.barrier()


if __name__ == "__main__":
    main()
    finish()

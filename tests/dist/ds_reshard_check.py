"""Worker: a checkpoint saved at EP=2 continues identically at another EP size after `msmoe convert`.

--phase save  (2 ranks, EP=2): train steps 0-2, save tag "s3"; then record the logits on step 3's
              global batch, train step 3, and record its loss and all weights after it (ref.pt).
--phase load  (W ranks, EP=W): build a differently-initialised model, load the converted
              checkpoint, and produce the same three things; errors against ref.pt go to rank<r>.json.
"""

import argparse
import os

import torch
import torch.distributed as dist

from ds_train_check import E, batch, build, train_step
from harness import finish, init_world, write_result
from parallel.groups import ParallelGroups


def global_logits(engine, step, rank, world):
    x, _ = batch(step, rank, world)
    with torch.no_grad():
        logits, _ = engine.module(x)
    parts = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(parts, logits.contiguous())
    return torch.cat(parts)


def all_weights(engine, groups):
    out = {}
    for name, p in engine.module.named_parameters():
        if getattr(p, "allreduce", True) is False:
            parts = [torch.empty_like(p) for _ in range(groups.ep_size)]
            dist.all_gather(parts, p.detach().contiguous(), group=groups.ep_group)
            out[name] = torch.cat(parts)  # [E, ...] in global expert order
        else:
            out[name] = p.detach().clone()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["save", "load"], required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    world = init_world()
    w, rank = world.world_size, world.rank
    groups = ParallelGroups.build(w, E)  # EP size = world size
    os.makedirs(args.out, exist_ok=True)
    if args.phase == "save":
        me = build(groups, w, zero=0, load_balance_coef=0.0)  # a loss that does not depend on the split
        for s in range(3):
            train_step(me, s, rank, w)
        me.engine.save_checkpoint(args.ckpt, tag="s3")
    else:
        me = build(groups, w, zero=0, seed=123, load_balance_coef=0.0)  # other weights until loaded
        path, _ = me.engine.load_checkpoint(args.ckpt, tag="s3")
        assert path is not None, "checkpoint not loaded"
    logits = global_logits(me.engine, 3, rank, w)
    loss = train_step(me, 3, rank, w)
    weights = all_weights(me.engine, groups)
    result = {"logits": logits, "loss": loss, "weights": weights}
    if args.phase == "save":
        if rank == 0:
            torch.save(result, os.path.join(args.out, "ref.pt"))
        report = {"rank": rank}
    else:
        ref = torch.load(os.path.join(os.path.dirname(args.out.rstrip("/")), "save", "ref.pt"), weights_only=False)
        rel = lambda a, b: float((a - b).abs().max() / (b.abs().max() + 1e-12))  # noqa: E731
        report = {
            "rank": rank, "ep_size": groups.ep_size,
            "logits_err": rel(logits, ref["logits"]),
            "loss": loss, "ref_loss": ref["loss"],
            "weights_err": max(rel(weights[n], ref["weights"][n]) for n in ref["weights"]),
            "same_names": sorted(weights) == sorted(ref["weights"]),
        }
    write_result(args.out, rank, report)
    dist.barrier()


if __name__ == "__main__":
    main()
    finish()

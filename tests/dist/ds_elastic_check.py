"""Worker: a run saved at EP=4 on 4 ranks continues at EP=2 on 2 ranks through ``--resume``'s
elastic path (training/checkpoint/store.py ``resume`` with training/checkpoint/elastic.py's reshard on load).

--phase save    (4 ranks, EP=4): train steps 0-4 straight, saving a committed checkpoint after step 3
                (training/checkpoint/store.py ``save``); rank 0 writes the losses and all weights after step 5
                (ref.pt). The loss has no balance term, so it does not depend on how the global batch
                of a step is split over the ranks.
--phase resume  (2 ranks, EP=2): build a differently-initialised model, resume (resharded EP 4 -> 2 on
                load), train steps 3-4; the losses and weights against ref.pt go to rank<r>.json.
"""

import argparse
import os

import torch
import torch.distributed as dist

from ds_reshard_check import all_weights
from ds_train_check import E, build, train_step
from harness import finish, init_world, write_result
from parallel.groups import ParallelGroups
from training.checkpoint import elastic, store
from training.checkpoint.layout import Layout

SAVE_AT, STEPS = 3, 5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["save", "resume"], required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    world = init_world()
    w, rank = world.world_size, world.rank
    groups = ParallelGroups.build(w, E)  # EP size = world size
    os.makedirs(args.out, exist_ok=True)
    report = {"rank": rank, "ep_size": groups.ep_size}
    if args.phase == "save":
        me = build(groups, w, load_balance_coef=0.0)
        losses = []
        for s in range(STEPS):
            losses.append(train_step(me, s, rank, w))
            if s + 1 == SAVE_AT:
                client = {"step": SAVE_AT, "ep_size": groups.ep_size, "world_size": w}
                store.save(me.engine, args.ckpt, SAVE_AT, client, keep_last=3, rank=rank, world_size=w)
        if rank == 0:
            torch.save({"losses": losses, "weights": all_weights(me.engine, groups)}, os.path.join(args.out, "ref.pt"))
        else:
            all_weights(me.engine, groups)  # the gathers need every rank
    else:
        me = build(groups, w, load_balance_coef=0.0, seed=123)  # other weights until loaded
        reshard = elastic.ElasticResume(Layout(groups.ep_size, w, 0), rank)
        client = store.resume(me.engine, args.ckpt, "elastic-check", prepare=reshard.prepare)
        losses = [train_step(me, s, rank, w) for s in range(int(client["step"]), STEPS)]
        weights = all_weights(me.engine, groups)
        ref = torch.load(os.path.join(os.path.dirname(args.out.rstrip("/")), "save", "ref.pt"), weights_only=False)
        diff = {n: float((weights[n] - ref["weights"][n]).abs().max()) for n in ref["weights"]}
        report.update({
            "note": reshard.note, "step": int(client["step"]), "losses": losses, "ref_losses": ref["losses"][SAVE_AT:],
            "same_names": sorted(weights) == sorted(ref["weights"]),
            "weights_max_abs": max(diff.values()), "worst": max(diff, key=diff.get),
            "weights_rel": max(diff[n] / float(ref["weights"][n].abs().max()) for n in diff),
            "staged": sorted(os.listdir(os.path.join(args.ckpt, elastic.STAGING, f"ep{groups.ep_size}"))),
        })
    write_result(args.out, rank, report)
    dist.barrier()


if __name__ == "__main__":
    main()
    finish()

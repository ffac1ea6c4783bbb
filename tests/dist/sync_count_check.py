"""Worker (under torchrun, or alone): host syncs per training step of the ReID job.

Builds the real trainer (DeepSpeed engine, EP dispatcher, data) for a config plus overrides,
runs warm-up steps, then counts the calls that would make a GPU wait (gpucheck/host_syncs.py) over
steps that are not logging steps, and writes one JSON per rank: syncs per step and the call
sites. The budget (DESIGN.md, GPU principles): one per dispatching MoE layer (the all-to-all
split sizes) plus one per step (the loss / finiteness / preemption all-reduce).
"""

import argparse

import torch.distributed as dist

from gpucheck.host_syncs import SyncCounter
from harness import finish, init_world, write_result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from parallel.dist import shutdown_distributed
    from reid.synth import ensure_synth
    from training.config import load_config
    from training.metrics.interval import IntervalStats
    from training.trainer import Trainer

    cfg = load_config(args.config, [*args.overrides, "train.log_every=1000", "train.ckpt_every=1000"])
    world = init_world()
    if world.rank == 0:
        ensure_synth(cfg.data.path, cfg.data.synth_spec(), progress=False)
    if world.world_size > 1:
        dist.barrier()
    trainer = Trainer(cfg, world)
    trainer.engine.train()
    interval = IntervalStats()
    for s in range(args.warmup):
        trainer.train_step(s, interval)
    per_step = []
    sites: dict = {}
    for s in range(args.warmup, args.warmup + args.steps):
        with SyncCounter() as counter:
            trainer.train_step(s, interval)
        per_step.append(counter.total)
        for site, n in counter.counts.items():
            sites[site] = sites.get(site, 0) + n
    report = {"rank": world.rank, "per_step": per_step, "sites": sites,
              "moe_layers": len(trainer.moe_layers), "ep_size": trainer.groups.ep_size}
    write_result(args.out, world.rank, report, indent=1)
    shutdown_distributed()


if __name__ == "__main__":
    main()
    finish()

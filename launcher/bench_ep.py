"""``msmoe bench ep``: one PatchMoE layer trained in a DeepSpeed engine at several EP sizes.

For each EP size it starts ``torchrun --nproc_per_node N`` on this module, times every step
(forward stages route / dispatch / experts / combine, then backward and optimizer step) and
counts all-to-all payload bytes against the analytic minimum

    k x routed patches x P*P*C x dtype size        per all-to-all (dispatch, combine, and the
                                                   same two again in backward)

  msmoe bench ep                           # 2 processes, EP 1 and 2, CPU/gloo
  msmoe bench ep --nproc 4 --ep-sizes 1,2,4 --json ep.json

The worker runs under any launcher by itself (rank 0 writes --result):
  torchrun --nproc_per_node 2 -m launcher.bench_ep --ep-size 2 --result ep.json
  deepspeed --num_gpus 2 --module launcher.bench_ep --ep-size 2 --result ep.json
  mpirun -np 2 python -m launcher.bench_ep --ep-size 2 --result ep.json
  accelerate launch --use_deepspeed --num_processes 2 --zero_stage 0 -m launcher.bench_ep --ep-size 2 --result ep.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _worker(args: argparse.Namespace) -> None:
    """Runs on every rank under torchrun (started as ``-m launcher.bench_ep``, not through the CLI)."""
    from launcher import allocator

    allocator.tune()  # as every msmoe command does
    from moe import BalanceConfig, ExpertConfig, PatchMoE, PatchMoEConfig, RouterConfig
    from moe.timing import WallTimer
    from parallel.all_to_all import CommCounter
    from parallel.dispatcher import build_dispatcher
    from parallel.dist import init_distributed
    from parallel.ds_moe import DeepSpeedMoE
    from parallel.engine import build_engine
    from parallel.groups import ParallelGroups

    world = init_distributed()
    groups = ParallelGroups.build(args.ep_size, args.experts)
    cfg = PatchMoEConfig(
        dim=args.dim, patch_size=args.patch,
        router=RouterConfig(num_experts=args.experts, top_k=args.top_k),
        expert=ExpertConfig(kind="ffn", hidden_dim=args.hidden),
        balance=BalanceConfig(load_balance_coef=0.01),
    )
    timer = WallTimer()
    counter = CommCounter()
    disp = build_dispatcher(groups, counter)
    torch.manual_seed(world.rank)
    model = DeepSpeedMoE(PatchMoE(cfg, dispatcher=disp, timer=timer), groups).to(world.device)
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
    }
    me = build_engine(model, groups, ds_config, lambda pg: torch.optim.AdamW(pg, lr=1e-3))
    # requires grad, as the output of a stem would: the dispatch all-to-all then has a backward too
    x = torch.randn(args.batch, args.size, args.size, args.dim, device=world.device, requires_grad=True)
    rows = []
    for step in range(args.warmup + args.steps):
        timer.reset()
        counter.reset()
        t0 = time.perf_counter()
        res = me.engine(x)
        loss = res.out.square().mean() + res.stats.aux_loss
        t1 = time.perf_counter()
        me.engine.backward(loss)
        t2 = time.perf_counter()
        me.engine.step()
        t3 = time.perf_counter()
        if step >= args.warmup:
            kept = int(res.stats.kept.sum())
            rows.append({
                **{k: v * 1e3 for k, v in timer.as_dict().items()},
                "forward": (t1 - t0) * 1e3, "backward": (t2 - t1) * 1e3, "optimizer": (t3 - t2) * 1e3,
                "step": (t3 - t0) * 1e3,
                "bytes_total": counter.total_bytes, "bytes_offrank": counter.offrank_bytes,
                "kept_rows": kept,
            })
    # per-rank medians, then the slowest rank (the step waits for it)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    gathered = [None] * world.world_size
    torch.distributed.all_gather_object(gathered, med)
    if world.rank == 0:
        row_bytes = args.patch * args.patch * args.dim * 4
        summary = {
            "ep_size": args.ep_size, "world": world.world_size,
            "ms": {k: max(g[k] for g in gathered) for k in ("route", "dispatch", "experts", "combine",
                                                           "forward", "backward", "optimizer", "step")},
            "bytes_per_step_total": sum(g["bytes_total"] for g in gathered),
            "bytes_per_step_offrank": sum(g["bytes_offrank"] for g in gathered),
            # 4 all-to-alls per step, each moving every routed slot once
            "analytic_min_bytes": 4 * sum(g["kept_rows"] for g in gathered) * row_bytes if args.ep_size > 1 else 0,
            "samples_per_s": args.batch * world.world_size / (max(g["step"] for g in gathered) / 1e3),
        }
        with open(args.result, "w") as fh:
            json.dump(summary, fh)
    torch.distributed.barrier()


def _shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=8, help="samples per rank")
    p.add_argument("--size", type=int, default=32, help="map height = width")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)


def _main_ep(args: argparse.Namespace) -> int:
    ep_sizes = [int(s) for s in args.ep_sizes.split(",")]
    results = []
    for ep in ep_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            result = os.path.join(tmp, "result.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "launcher.bench_ep", "--ep-size", str(ep), "--result", result]
            for name in ("batch", "size", "dim", "hidden", "experts", "top_k", "patch", "steps", "warmup"):
                cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return proc.returncode
            with open(result) as fh:
                results.append(json.load(fh))
    print(f"EP bench: {args.nproc} processes, {args.batch} samples/rank of {args.size}x{args.size}x{args.dim}, "
          f"E={args.experts} K={args.top_k} P={args.patch} F={args.hidden}, DeepSpeed ZeRO 0, median of {args.steps} steps")
    cols = ("route", "dispatch", "experts", "combine", "forward", "backward", "optimizer", "step")
    print(f"{'EP':>3s} " + " ".join(f"{c:>9s}" for c in cols) + f" {'a2a MB':>8s} {'min MB':>8s} {'offrank MB':>10s} {'samples/s':>9s}")
    for r in results:
        print(f"{r['ep_size']:>3d} " + " ".join(f"{r['ms'][c]:9.2f}" for c in cols)
              + f" {r['bytes_per_step_total'] / 1e6:8.3f} {r['analytic_min_bytes'] / 1e6:8.3f}"
              + f" {r['bytes_per_step_offrank'] / 1e6:10.3f} {r['samples_per_s']:9.1f}")
    print("(times in ms per step, slowest rank; a2a MB = all-to-all payload per step, all ranks)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


def add_ep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ep", help="expert-parallel step time and all-to-all bytes at several EP sizes")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--ep-sizes", default="1,2")
    p.add_argument("--json", default=None)
    _shape_args(p)
    p.set_defaults(func=_main_ep)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep-size", type=int, required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the deepspeed launcher adds it
    _shape_args(ap)
    _worker(ap.parse_args())
    from parallel.dist import leave_distributed

    leave_distributed(0)

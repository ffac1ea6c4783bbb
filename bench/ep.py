"""The EP benchmark (``msmoe bench ep``; command lines in launcher/bench.py and, for the worker,
launcher/bench_ep.py): one PatchMoE layer trained in a DeepSpeed engine at several EP sizes.

For each EP size it starts ``torchrun --nproc_per_node N`` on the worker, times every step
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

import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

WORKER = "launcher.bench_ep"  # the worker's entry point (parses EpShape's fields as --options)


@dataclass(frozen=True)
class EpShape:
    batch: int = 8  # samples per rank
    size: int = 32  # map height = width
    dim: int = 64
    hidden: int = 128
    experts: int = 8
    top_k: int = 2
    patch: int = 4
    steps: int = 10
    warmup: int = 3


def run_worker(shape: EpShape, ep_size: int, result: str) -> None:
    """Runs on every rank under a launcher; rank 0 writes the slowest rank's medians to ``result``."""
    from moe import BalanceConfig, ExpertConfig, PatchMoE, PatchMoEConfig, RouterConfig
    from moe.timing import WallTimer
    from parallel.all_to_all import CommCounter
    from parallel.dispatcher import build_dispatcher
    from parallel.dist import init_distributed
    from parallel.ds_moe import DeepSpeedMoE
    from parallel.engine import build_engine
    from parallel.groups import ParallelGroups

    world = init_distributed()
    groups = ParallelGroups.build(ep_size, shape.experts)
    cfg = PatchMoEConfig(
        dim=shape.dim, patch_size=shape.patch,
        router=RouterConfig(num_experts=shape.experts, top_k=shape.top_k),
        expert=ExpertConfig(kind="ffn", hidden_dim=shape.hidden),
        balance=BalanceConfig(load_balance_coef=0.01),
    )
    timer = WallTimer()
    counter = CommCounter()
    disp = build_dispatcher(groups, counter, timer)
    torch.manual_seed(world.rank)
    model = DeepSpeedMoE(PatchMoE(cfg, dispatcher=disp, timer=timer), groups).to(world.device)
    ds_config = {
        "train_micro_batch_size_per_gpu": shape.batch, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
    }
    me = build_engine(model, groups, ds_config, lambda pg: torch.optim.AdamW(pg, lr=1e-3))
    # requires grad, as the output of a stem would: the dispatch all-to-all then has a backward too
    x = torch.randn(shape.batch, shape.size, shape.size, shape.dim, device=world.device, requires_grad=True)
    rows = _timed_steps(me.engine, x, timer, counter, shape)
    # per-rank medians, then the slowest rank (the step waits for it)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    gathered = [None] * world.world_size
    torch.distributed.all_gather_object(gathered, med)
    if world.rank == 0:
        with open(result, "w") as fh:
            json.dump(_summary(gathered, shape, ep_size, world.world_size), fh)
    torch.distributed.barrier()


def _timed_steps(engine, x: torch.Tensor, timer, counter, shape: EpShape) -> list[dict]:
    """One row per timed step (after the warm-up): stage and phase times in ms, all-to-all bytes, kept rows."""
    rows = []
    for step in range(shape.warmup + shape.steps):
        timer.reset()
        counter.reset()
        t0 = time.perf_counter()
        res = engine(x)
        loss = res.out.square().mean() + res.stats.aux_loss
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        if step >= shape.warmup:
            kept = int(res.stats.kept.sum())
            rows.append({
                **{k: v * 1e3 for k, v in timer.as_dict().items()},
                "forward": (t1 - t0) * 1e3, "backward": (t2 - t1) * 1e3, "optimizer": (t3 - t2) * 1e3,
                "step": (t3 - t0) * 1e3,
                "bytes_total": counter.total_bytes, "bytes_offrank": counter.offrank_bytes,
                "kept_rows": kept,
            })
    return rows


def _summary(gathered: list[dict], shape: EpShape, ep_size: int, world_size: int) -> dict:
    """The slowest rank's medians (the step waits for it), bytes summed over the ranks."""
    row_bytes = shape.patch * shape.patch * shape.dim * 4
    return {
        "ep_size": ep_size, "world": world_size,
        "ms": {k: max(g[k] for g in gathered) for k in ("route", "dispatch", "experts", "combine",
                                                       "forward", "backward", "optimizer", "step")},
        "bytes_per_step_total": sum(g["bytes_total"] for g in gathered),
        "bytes_per_step_offrank": sum(g["bytes_offrank"] for g in gathered),
        # 4 all-to-alls per step, each moving every routed slot once
        "analytic_min_bytes": 4 * sum(g["kept_rows"] for g in gathered) * row_bytes if ep_size > 1 else 0,
        "samples_per_s": shape.batch * world_size / (max(g["step"] for g in gathered) / 1e3),
    }


class BenchError(RuntimeError):
    """A benchmark job failed; the message holds the end of its output."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


def run_sweep(shape: EpShape, nproc: int, ep_sizes: list[int]) -> list[dict]:
    """One torchrun job of ``nproc`` workers per EP size; their results, in order."""
    from parallel.launchenv import torchrun_command

    results = []
    for ep in ep_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            result = os.path.join(tmp, "result.json")
            options = [a for name, v in asdict(shape).items() for a in (f"--{name.replace('_', '-')}", str(v))]
            cmd = torchrun_command(nproc, ["-m", WORKER, "--ep-size", str(ep), "--result", result, *options])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise BenchError(f"EP {ep}: the workers exited {proc.returncode}:\n{proc.stderr[-4000:]}",
                                 proc.returncode)
            with open(result) as fh:
                results.append(json.load(fh))
    return results


def print_results(shape: EpShape, nproc: int, results: list[dict]) -> None:
    print(f"EP bench: {nproc} processes, {shape.batch} samples/rank of {shape.size}x{shape.size}x{shape.dim}, "
          f"E={shape.experts} K={shape.top_k} P={shape.patch} F={shape.hidden}, DeepSpeed ZeRO 0, median of {shape.steps} steps")
    cols = ("route", "dispatch", "experts", "combine", "forward", "backward", "optimizer", "step")
    print(f"{'EP':>3s} " + " ".join(f"{c:>9s}" for c in cols) + f" {'a2a MB':>8s} {'min MB':>8s} {'offrank MB':>10s} {'samples/s':>9s}")
    for r in results:
        print(f"{r['ep_size']:>3d} " + " ".join(f"{r['ms'][c]:9.2f}" for c in cols)
              + f" {r['bytes_per_step_total'] / 1e6:8.3f} {r['analytic_min_bytes'] / 1e6:8.3f}"
              + f" {r['bytes_per_step_offrank'] / 1e6:10.3f} {r['samples_per_s']:9.1f}")
    print("(times in ms per step, slowest rank; a2a MB = all-to-all payload per step, all ranks)")

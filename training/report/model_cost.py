"""What the model costs, as the thesis reports it: parameters (total, and active per routed patch),
FLOPs and latency per image at inference, and peak memory.

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` records every matmul
and convolution the forward pass really runs (``torch._grouped_mm``, which torch's counter does
not know, is added here: 2 * rows * D * F). Under expert parallelism each rank counts what it
computes; the sum over ranks is divided by the images of the global batch.
"""

from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

_aten = torch.ops.aten


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """[T, D] x [E, D, F] -> [T, F]: each of the T rows meets one expert's D x F matrix."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


CUSTOM_FLOPS = {_aten._grouped_mm: _grouped_mm_flops} if hasattr(_aten, "_grouped_mm") else {}


def count_flops(fn, *args) -> tuple[int, object]:
    """(FLOPs of ``fn(*args)`` on this rank, its result)."""
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        out = fn(*args)
    return int(counter.get_total_flops()), out


def parameter_counts(model: torch.nn.Module, moe_layers, ep_size: int) -> dict:
    """total: every parameter once (the dense ones, and the experts of every EP rank: this rank holds
    1 / ep_size of them); active_per_patch: the dense parameters plus, per MoE layer, the parameters
    of the experts one routed patch passes through (k of the layer's E)."""
    local_expert_ids = {id(p) for layer in moe_layers for p in layer.experts.parameters()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in local_expert_ids)
    experts = 0
    active = dense
    for layer in moe_layers:  # PatchMoE / HierarchicalMoE, experts stacked [E_local, ...]
        params = list(layer.experts.parameters())
        local = sum(p.numel() for p in params)
        experts += local * ep_size
        active += local / params[0].shape[0] * _slots(layer)
    return {"total": int(dense + experts), "dense": int(dense), "experts": int(experts),
            "active_per_patch": int(active)}


def _slots(layer) -> int:
    """Experts a routed patch passes through: top-k (the largest k with dynamic k); one per fine
    slot of each coarse group in the hierarchical layer; for the hierarchical head fusion, the
    experts one image passes through (top_k in each of its modalities x scales cells)."""
    cfg = layer.cfg
    if hasattr(cfg, "router"):
        return cfg.router.max_k
    if hasattr(cfg, "experts_per_cell"):
        return cfg.num_cells * cfg.top_k
    return cfg.coarse.max_k * cfg.fine.max_k


@torch.no_grad()
def inference_memory_mb(model, batch, device: torch.device) -> float:
    """Tensor memory of one inference forward at its peak, MiB: the weights plus the largest set of
    live activations. CUDA: the allocator's peak (reset first); CPU (no allocator statistics): the
    profiler's record of every allocation and free, summed in order, plus the weights."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        model(batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(batch)
    live = peak = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += ev.self_cpu_memory_usage  # an op's own allocations; "[memory]" events: frees
        peak = max(peak, live)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return (weights + peak) / 2**20


@torch.no_grad()
def inference_cost(model, batch, world_size: int, device: torch.device, repeats: int = 3) -> dict:
    """FLOPs and latency per image of the inference forward on ``batch`` (this rank's images);
    every rank calls it with a batch of the same size (the all-to-alls pair up)."""
    was_training = model.training
    model.eval()
    try:
        model(batch)  # warm-up: first calls, allocator
        flops, _ = count_flops(model, batch)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        memory_mb = inference_memory_mb(model, batch, device)
    finally:
        model.train(was_training)
    images = batch.rgb.shape[0]
    totals = torch.tensor([flops, images, min(times), memory_mb], dtype=torch.float64, device=device)
    if world_size > 1:  # FLOPs and images add up; time and memory: the largest rank's
        summed = totals[:2].clone()
        dist.all_reduce(summed)
        largest = totals[2:].clone()
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        totals = torch.cat([summed, largest])
    flops_all, images_all, seconds, memory_mb = totals.tolist()
    per_rank = images_all / world_size
    return {"flops_per_image": flops_all / images_all, "batch_latency_ms": 1e3 * seconds,
            "latency_ms_per_image": 1e3 * seconds / per_rank, "batch_per_rank": int(per_rank),
            "peak_mem_mb": memory_mb,
            "timed_repeats": repeats}


def run_cost(model, moe_layers, ep_size: int, batch, world_size: int, device) -> dict:
    """Parameters, FLOPs and latency per image at inference of the run's model; every rank calls it
    (``moe_layers``: the DeepSpeed-wrapped MoE layers, parallel/ds_moe.py)."""
    inner = [layer.deepspeed_moe for layer in moe_layers]
    return {"parameters": parameter_counts(model, inner, ep_size),
            "inference": inference_cost(model, batch, world_size, device)}


def gather_peak_memory_mb(device: torch.device, rank: int, world_size: int) -> list[float]:
    """Peak memory of every rank (CUDA: max allocated; CPU: max RSS), gathered to all ranks."""
    if device.type == "cuda":
        mine = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = torch.zeros(world_size, dtype=torch.float64, device=device)
    t[rank] = mine
    if world_size > 1:
        dist.all_reduce(t)
    return t.tolist()

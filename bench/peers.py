"""The peers ``msmoe bench layer`` races against, built with equal shapes and active FLOPs.

Legend: B batch, H/W map, C channels, F expert hidden, E experts, K top-k (2 for the peers).

- DeepSpeed: ``deepspeed.moe.layer.MoE`` (top-2 gate, ``drop_tokens=False`` so every token
  reaches its 2 experts, as in our dropless mode), one rank, its own all-to-all on a 1-rank group.
- fairscale: ``fairscale.nn.MOELayer`` with ``Top2Gate``. Its dispatch is a dense one-hot
  einsum over [tokens, E, capacity]: memory grows with tokens^2, so it is fed groups of at most
  ``group_tokens`` tokens (GShard's "groups"), one call per group.

Both need a process group; :func:`single_rank_group` makes a 1-rank one (gloo on CPU, NCCL on
CUDA) if none exists.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.nn as nn


def single_rank_group(device: torch.device) -> None:
    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        tmp = tempfile.mkdtemp(prefix="msmoe-bench-")
        atexit.register(shutil.rmtree, tmp, True)
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    from parallel.ds_ops import prepare_shm_op

    prepare_shm_op()
    deepspeed.init_distributed(dist_backend=backend)  # DeepSpeed's comm layer adopts the group above


def _ffn(c: int, f: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c, f), nn.GELU(), nn.Linear(f, c))


class DeepSpeedMoE(nn.Module):
    """[B, H, W, C] -> [B, H, W, C] through DeepSpeed's MoE layer (EP=1).

    ``group_tokens`` = 0 feeds every token in one call (one gating group, as DeepSpeed does with a
    rank's micro-batch); > 0 feeds groups of that many tokens, one call each. Its gating builds
    [tokens, E, capacity] tensors with capacity ~ 2 * tokens / E without token dropping, so memory
    grows with tokens^2: the GPU shape's 102,400 points in one group need ~100 GB for one of them.
    """

    def __init__(self, c: int, f: int, e: int, k: int = 2, group_tokens: int = 0):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.group_tokens = group_tokens
        self.moe = MoE(hidden_size=c, expert=_ffn(c, f), num_experts=e, ep_size=1, k=k, capacity_factor=1.0,
                       eval_capacity_factor=1.0, min_capacity=4, drop_tokens=False, use_rts=False)
        self.moe.set_deepspeed_parallelism()

    def forward(self, x_BHWC: torch.Tensor) -> torch.Tensor:
        if not self.group_tokens:
            out, _aux, _counts = self.moe(x_BHWC)
            return out
        c = x_BHWC.shape[-1]
        outs = [self.moe(chunk)[0] for chunk in x_BHWC.reshape(-1, c).split(self.group_tokens)]
        return torch.cat(outs).reshape(x_BHWC.shape)


class FairscaleMoE(nn.Module):
    """[B, H, W, C] -> [B, H, W, C] through fairscale's MOELayer + Top2Gate, in token groups."""

    def __init__(self, c: int, f: int, e: int, group_tokens: int = 2048):
        super().__init__()
        from fairscale.nn import MOELayer, Top2Gate

        self.e = e
        self.group_tokens = max(e, group_tokens // e * e)
        self.moe = MOELayer(Top2Gate(c, e), nn.ModuleList([_ffn(c, f) for _ in range(e)]))

    def forward(self, x_BHWC: torch.Tensor) -> torch.Tensor:
        c = x_BHWC.shape[-1]
        x_TC = x_BHWC.reshape(-1, c)
        outs = []
        for chunk in x_TC.split(self.group_tokens):
            n = chunk.shape[0]
            pad = (-n) % self.e  # Top2Gate needs tokens divisible by E
            if pad:
                chunk = torch.cat([chunk, chunk.new_zeros(pad, c)])
            y = self.moe(chunk.unsqueeze(1).contiguous())
            outs.append(y.reshape(-1, c)[:n])
        return torch.cat(outs).reshape(x_BHWC.shape)


def dense_gemm_peak_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """Measured peak of one square matmul (the ceiling the MoE layers are compared with on a GPU)."""
    import time

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12

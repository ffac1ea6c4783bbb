"""DeepSpeed engine construction and gradient clipping that is correct under expert parallelism.

Clipping: the global gradient norm counts every parameter once,
    ||g||^2 = sum_dense ||g_p||^2  +  sum over all E experts ||g_e||^2.
After the engine's reduction dense gradients are identical on every rank, and each expert's
gradient is identical on the ranks of its expert-data-parallel group, so the expert part is
this rank's local experts summed over the expert-parallel group only.

  ZeRO 0:   DeepSpeed's ``clip_grad_norm_`` averages each rank's local norm over the data-
            parallel group; under EP every rank sees only its own experts, so that is not the
            global norm (seen: 0.508 instead of 0.544 at EP=2). msmoe switches it off and runs
            :func:`clip_grad_norm_ep` between backward and step.
  ZeRO 1/2: the ZeRO optimizer sums squared partition norms over the whole data-parallel
            group, where every expert's partition appears exactly once: correct (seen equal
            to EP=1 and to clip_grad_norm_ep), so DeepSpeed clips there.
:class:`MoEEngine` applies that rule; the trainer just calls ``clip_gradients()``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel.groups import ParallelGroups


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def moe_param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer param groups split as DeepSpeed's MoE-aware optimizers require."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    base = [{"params": params, "name": "dense", "weight_decay": weight_decay}]
    return split_params_into_different_moe_groups_for_optimizer(base)


@dataclass(frozen=True)
class MoEEngine:
    """A DeepSpeed engine plus the clipping rule for its ZeRO stage."""

    engine: Any
    groups: ParallelGroups
    zero_stage: int
    grad_clip: float

    def clip_gradients(self) -> float | None:
        """Call between ``engine.backward`` and ``engine.step``. Returns the global norm when
        msmoe clipped (ZeRO 0); at ZeRO 1/2 DeepSpeed clips inside ``step`` and this is None."""
        if self.zero_stage > 0 or self.grad_clip <= 0:
            return None
        return clip_grad_norm_ep(self.engine.module.parameters(), self.grad_clip, self.groups)


def build_engine(
    model: nn.Module,
    groups: ParallelGroups,
    ds_config: dict,
    optimizer_factory: Callable[[list[dict]], torch.optim.Optimizer],
    grad_clip: float | None = None,
    weight_decay: float = 0.0,
) -> MoEEngine:
    """deepspeed.initialize with our optimizer over MoE-split param groups.

    ``grad_clip`` (default: the config's ``gradient_clipping``) is applied by DeepSpeed at
    ZeRO 1/2 and by msmoe at ZeRO 0 (see the module docstring).
    """
    import deepspeed

    cfg = copy.deepcopy(ds_config)
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2):
        raise ValueError(f"zero_optimization.stage={stage}: msmoe supports ZeRO stages 0, 1 and 2 with MoE "
                         "(DeepSpeed's native MoE does not support stage 3)")
    clip = float(cfg.get("gradient_clipping", 0.0) if grad_clip is None else grad_clip)
    cfg["gradient_clipping"] = clip if stage > 0 else 0.0
    optimizer = optimizer_factory(moe_param_groups(model, weight_decay))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, dist_init_required=False)
    return MoEEngine(engine, groups, stage, clip)


def grad_norm_ep(params: Iterable[torch.Tensor], groups: ParallelGroups) -> torch.Tensor:
    """Global L2 norm of reduced gradients, each expert and each dense parameter counted once."""
    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    device = None
    for p in params:
        if p.grad is None:
            continue
        device = p.grad.device
        sq = p.grad.detach().double().square().sum().cpu()
        if is_expert_param(p):
            expert_sq += sq
        else:
            dense_sq += sq
    comm_device = device if (device is not None and device.type == "cuda") else torch.device("cpu")
    expert_sq = expert_sq.to(comm_device)
    if groups.ep_size > 1:
        dist.all_reduce(expert_sq, group=groups.ep_group)
    return (dense_sq.to(comm_device) + expert_sq).sqrt()


def clip_grad_norm_ep(params: Iterable[torch.Tensor], max_norm: float, groups: ParallelGroups) -> float:
    """Scale gradients so the global norm is at most ``max_norm``; returns the norm before."""
    params = [p for p in params if p.grad is not None]
    total = float(grad_norm_ep(params, groups))
    if not math.isfinite(total):
        return total
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.detach().mul_(coef)
    return total


@torch.no_grad()
def sync_batchnorm_stats(model: nn.Module, groups: ParallelGroups) -> None:
    """Average BatchNorm running statistics over the data-parallel group.

    Each rank normalises its own batch in training, so its running mean/var drift apart from
    the other ranks'; DeepSpeed checkpoints only rank 0's copy. Averaging after every step keeps
    them identical everywhere: evaluation gives the same features on every rank, and a model
    loaded from a checkpoint evaluates exactly as the run that saved it.
    """
    bufs = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var) if b is not None]
    if not bufs or groups.world_size == 1:
        return
    flat = torch.cat([b.flatten().float() for b in bufs])
    dist.all_reduce(flat, group=groups.dp_group)
    flat /= groups.world_size
    i = 0
    for b in bufs:
        b.copy_(flat[i:i + b.numel()].view_as(b))
        i += b.numel()

"""DeepSpeed engine construction and gradient clipping that is correct under expert parallelism.

Clipping: the global gradient norm counts every parameter once,
    ||g||^2 = sum_dense ||g_p||^2  +  sum over all E experts ||g_e||^2.
After the engine's reduction dense gradients are identical on every rank, and each expert's
gradient is identical on the ranks of its expert-data-parallel group, so the expert part is
this rank's local experts summed over the expert-parallel group only.

  ZeRO 0:   DeepSpeed's ``clip_grad_norm_`` averages each rank's local norm over the data-
            parallel group; under EP every rank sees only its own experts, so that is not the
            global norm. msmoe switches it off and runs
            :func:`clip_grad_norm_ep` between backward and step.
  ZeRO 1/2: the ZeRO optimizer sums squared partition norms over the whole data-parallel
            group, where every expert's partition appears exactly once: correct (equal to
            EP=1 and to clip_grad_norm_ep), so DeepSpeed clips there.
:class:`MoEEngine` applies that rule; the trainer just calls ``clip_gradients()``
(``clips_gradients`` says whether msmoe or DeepSpeed clips).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from common import compat
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

    @property
    def clips_gradients(self) -> bool:
        """True when msmoe clips (ZeRO 0 with a clip); at ZeRO 1/2 DeepSpeed clips inside ``step``."""
        return self.zero_stage == 0 and self.grad_clip > 0

    def clip_gradients(self) -> None:
        """Call between ``engine.backward`` and ``engine.step``: clips to the global norm
        (:func:`clip_grad_norm_ep`) when msmoe clips, else leaves the gradients to DeepSpeed."""
        if self.clips_gradients:
            clip_grad_norm_ep(self.engine.module.parameters(), self.grad_clip, self.groups)


def bf16_reduction(zero_stage: int) -> dict:
    """DeepSpeed settings for bf16 weights with fp32 gradient arithmetic.

    Gradients are all-reduced / reduce-scattered in fp32 (``communication_data_type``: bf16 sums
    over ranks lose the low bits of every gradient). At ZeRO 1, fp32 gradient accumulation selects
    DeepSpeed's BF16 optimizer (fp32 master weights and gradients); ZeRO 0 and 2 keep fp32 master
    weights in their own optimizer wrappers (DeepSpeed allows fp32 accumulation at stage 1 only).
    """
    cfg: dict = {"communication_data_type": "fp32"}
    if zero_stage == 1:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


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


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """sum ||g||^2 over ``grads`` as a 0-d float64 tensor on ``device``: one fused norm, no host read."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack([n.double() for n in compat.foreach_norm(grads)]).square().sum()


def grad_norm_ep(params: Iterable[torch.Tensor], groups: ParallelGroups) -> torch.Tensor:
    """Global L2 norm of reduced gradients, each expert and each dense parameter counted once.

    A 0-d float64 tensor on the gradients' device; computed without reading it on the host (the
    expert part is all-reduced over the EP group on the device)."""
    grads = [(p.grad.detach(), is_expert_param(p)) for p in params if p.grad is not None]
    device = grads[0][0].device if grads else torch.device("cpu")
    dense_sq = _sum_of_squares([g for g, e in grads if not e], device)
    expert_sq = _sum_of_squares([g for g, e in grads if e], device)
    if groups.ep_size > 1:
        if device.type not in ("cuda", "cpu"):
            expert_sq = expert_sq.cpu()  # gloo reduces host tensors
        dist.all_reduce(expert_sq, group=groups.ep_group)
    return (dense_sq + expert_sq.to(device)).sqrt()


def clip_grad_norm_ep(params: Iterable[torch.Tensor], max_norm: float, groups: ParallelGroups) -> torch.Tensor:
    """Scale gradients so the global norm is at most ``max_norm``; returns the norm before (0-d).

    No host sync: the scale min(1, max_norm / norm) is applied as a tensor (1 when the norm is
    not finite, so a non-finite step is left for the finiteness check to skip)."""
    params = [p for p in params if p.grad is not None]
    total = grad_norm_ep(params, groups)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    coef = torch.where(torch.isfinite(total), coef, torch.ones_like(coef))
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad.detach())
    for dtype, grads in by_dtype.items():
        compat.foreach_mul_(grads, coef.to(dtype))
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

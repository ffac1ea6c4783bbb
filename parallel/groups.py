"""The process groups of expert parallelism, built once and passed to whoever needs them.

World of W ranks, expert-parallel size P (W % P == 0), D = W / P replicas of each expert:
  ep   (expert parallel)       P consecutive ranks that together hold all E experts and
                               exchange patches by all-to-all: [0..P-1], [P..2P-1], ...
  edp  (expert data parallel)  the D ranks holding the same experts; expert gradients are
                               averaged here: [r, r+P, r+2P, ...]
  dp   (data parallel)         all W ranks; dense (non-expert) gradients are averaged here

The groups are DeepSpeed's own (``deepspeed.utils.groups``, named ``ep_size_<P>``), so its
engine reduces expert gradients over exactly the edp group we dispatch with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as tdist


class ParallelConfigError(ValueError):
    pass


def validate_sizes(world_size: int, ep_size: int, num_experts: int) -> None:
    """Errors name the numbers and what would work."""
    if ep_size < 1:
        raise ParallelConfigError(f"ep_size={ep_size} must be >= 1")
    if world_size % ep_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by ep_size={ep_size}; choose ep_size in {divisors}"
        )
    if num_experts % ep_size:
        raise ParallelConfigError(
            f"num_experts={num_experts} is not divisible by ep_size={ep_size}: every expert-parallel "
            f"rank must hold the same number of experts"
        )


def group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert groups of EP size ``ep_size`` (also in optimizer param groups)."""
    return f"ep_size_{ep_size}"


@dataclass(frozen=True)
class ParallelGroups:
    world_size: int
    rank: int
    ep_size: int
    ep_rank: int
    ep_group: Any
    edp_size: int
    edp_group: Any
    dp_group: Any
    name: str  # DeepSpeed's group name, "ep_size_<P>"

    @staticmethod
    def build(ep_size: int, num_experts: int, timeout_s: float | None = None) -> "ParallelGroups":
        """Create (or reuse) DeepSpeed's ep/edp groups for ``ep_size``; call after init_distributed.

        ``timeout_s``: how long a collective on these groups waits for a silent rank before it
        fails (DeepSpeed creates its subgroups with torch's 30-minute default otherwise)."""
        from datetime import timedelta

        from deepspeed.utils import groups as ds_groups

        world, rank = tdist.get_world_size(), tdist.get_rank()
        validate_sizes(world, ep_size, num_experts)
        name = group_name(ep_size)
        if name not in ds_groups._get_expert_parallel_group_dict():
            ds_groups._create_expert_and_data_parallel(ep_size)
        ep_group = ds_groups._get_expert_parallel_group(name)
        edp_group = ds_groups._get_expert_data_parallel_group(name)
        if timeout_s is not None:
            from torch.distributed.distributed_c10d import _set_pg_timeout

            from parallel.nccl import group_timeout_s

            seconds = group_timeout_s(tdist.get_backend(), timeout_s)  # NCCL: the watchdog's, see parallel/nccl.py
            for g in {id(g): g for g in (ep_group, edp_group, ds_groups._get_data_parallel_group())}.values():
                _set_pg_timeout(timedelta(seconds=seconds), g)
        return ParallelGroups(
            world_size=world, rank=rank,
            ep_size=ep_size, ep_rank=tdist.get_rank(ep_group), ep_group=ep_group,
            edp_size=tdist.get_world_size(edp_group), edp_group=edp_group,
            dp_group=ds_groups._get_data_parallel_group(), name=name,
        )

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

import torch
import torch.distributed as tdist

from common.errors import UserError
from moe.config import expert_sharding_error


class ParallelConfigError(UserError, ValueError):
    pass


def validate_sizes(world_size: int, ep_size: int, num_experts: int) -> None:
    """Errors name the numbers and what would work (the check itself: moe.config.expert_sharding_error)."""
    problem = expert_sharding_error(num_experts, ep_size, world_size)
    if problem is not None:
        raise ParallelConfigError(problem)


def group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert groups of EP size ``ep_size`` (also in optimizer param groups)."""
    return f"ep_size_{ep_size}"


@dataclass(frozen=True)
class ExpertGroup:
    """E experts sharded evenly over one process group of P ranks: what a dispatcher exchanges over.

    Rank r of the group holds the El = E / P experts first_expert .. first_expert + El - 1, with
    first_expert = r * El. Built by :meth:`of`, which checks P | E; nothing else derives these.
    """

    group: Any
    size: int  # P
    rank: int  # r, this rank's index in the group
    ranks: tuple[int, ...]  # [P] global rank of each member
    num_experts: int  # E
    num_local_experts: int  # El
    first_expert: int  # global id of this rank's first expert
    device: torch.device  # where the group's collectives take their tensors

    @staticmethod
    def of(group: Any, num_experts: int) -> "ExpertGroup":
        size, rank = tdist.get_world_size(group), tdist.get_rank(group)
        problem = expert_sharding_error(num_experts, size)
        if problem is not None:
            raise ParallelConfigError(problem)
        per_rank = num_experts // size
        if tdist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        return ExpertGroup(group=group, size=size, rank=rank, ranks=tuple(tdist.get_process_group_ranks(group)),
                           num_experts=num_experts, num_local_experts=per_rank, first_expert=rank * per_rank,
                           device=device)


@dataclass(frozen=True)
class ParallelGroups:
    """The groups, and where this rank's experts are (``ep``); ``ep_size`` and friends read ``ep``."""

    world_size: int
    rank: int
    ep: ExpertGroup
    edp_size: int
    edp_group: Any
    dp_group: Any
    name: str  # DeepSpeed's group name, "ep_size_<P>"

    @property
    def ep_size(self) -> int:
        return self.ep.size

    @property
    def ep_group(self) -> Any:
        return self.ep.group

    @property
    def num_experts(self) -> int:
        return self.ep.num_experts

    @property
    def num_local_experts(self) -> int:
        return self.ep.num_local_experts

    @property
    def first_expert(self) -> int:
        return self.ep.first_expert

    @property
    def device(self) -> torch.device:
        return self.ep.device

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
            world_size=world, rank=rank, ep=ExpertGroup.of(ep_group, num_experts),
            edp_size=tdist.get_world_size(edp_group), edp_group=edp_group,
            dp_group=ds_groups._get_data_parallel_group(), name=name,
        )

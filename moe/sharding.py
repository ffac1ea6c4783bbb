"""Whether E experts shard evenly over an expert-parallel group: the arithmetic every layer of the
stack checks the same way (the run config, the launcher's preflight, parallel/groups.py)."""

from __future__ import annotations


def expert_sharding_error(num_experts: int, ep_size: int, world_size: int | None = None, *,
                          experts_field: str = "num_experts", ep_field: str = "ep_size") -> str | None:
    """Why ``num_experts`` experts cannot be sharded evenly over ``ep_size`` expert-parallel ranks
    (of a world of ``world_size``, when given); None when they can. The one place this is checked:
    ``parallel.groups`` raises it as a ParallelConfigError, the run config as a ConfigError, each
    naming its own fields (``experts_field``, ``ep_field``)."""
    if ep_size < 1:
        return f"{ep_field}={ep_size} must be >= 1"
    if world_size is not None and world_size % ep_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        return f"world size {world_size} is not divisible by {ep_field}={ep_size}; choose {ep_field} in {divisors}"
    if num_experts % ep_size:
        return (f"{experts_field}={num_experts} is not divisible by {ep_field}={ep_size}: every expert-parallel "
                f"rank must hold the same number of experts")
    return None

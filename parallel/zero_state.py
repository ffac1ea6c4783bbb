"""A ZeRO stage 1/2 checkpoint's optimizer state, rebuilt as the plain state ZeRO 0 saves per EP rank.

ZeRO 1/2 (DeepSpeed's ``DeepSpeedZeroOptimizer``) flattens each optimizer param group into one
vector and cuts it into equal partitions, one per rank of the group's data-parallel group:
  dense group      all W ranks; rank r's piece is in ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt``
  expert group     ("moe": True, named ``ep_size_<P>``) the W/P ranks that hold the same experts:
                   EP rank e's experts are split over global ranks e, e+P, e+2P, ... in that order
Each file holds its partition of every Adam moment (``exp_avg``, ``exp_avg_sq``: [partition]) and
``param_slice_mappings``: for every parameter with a piece in the partition, where that piece lies
(start, numel). A parameter's pieces, taken in partition order, are the parameter flattened. The
model file lists each group's parameter names and shapes in optimizer order (``param_shapes``).

:func:`plain_states` puts the pieces together into the P per-EP-rank optimizer state dicts that a
ZeRO 0 run at EP=P writes into ``expp_rank_<e>_mp_rank_00_optim_states.pt``: ``state`` keyed by the
parameter's index over all groups, its tensors shaped like the parameter (experts stacked
[E_local, ...]). parallel/reshard.py then moves experts to another EP size as for ZeRO 0, and
parallel/zero_load.py puts such a state back into a live ZeRO 1/2 engine at any EP / world size.

Only fp32 weights: with bf16/fp16 the fp32 master weights live in the partitions too and the
module's weights are not them, so such a checkpoint is refused (:class:`ZeroStateError`).
"""

from __future__ import annotations

import copy
import math
import os
import re

import torch

ZERO_FILE = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
_ZERO_FILE_RE = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


class ZeroStateError(ValueError):
    """A ZeRO checkpoint whose optimizer state cannot be rebuilt (msmoe exits 2 with it)."""


def zero_stage_of(model_states: dict) -> int:
    """The ZeRO stage a checkpoint was saved with (its model file's DeepSpeed config)."""
    return int(((model_states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))


def low_precision_of(model_states: dict) -> str | None:
    """"bf16" / "fp16" when the checkpoint trained with low-precision weights, else None."""
    cfg = model_states.get("ds_config") or {}
    return next((k for k in ("bf16", "fp16") if (cfg.get(k) or {}).get("enabled")), None)


def zero_files(tag_dir: str) -> dict[int, str]:
    """data-parallel rank -> its ZeRO optimizer file in ``tag_dir``."""
    out = {}
    for f in os.listdir(tag_dir):
        m = _ZERO_FILE_RE.fullmatch(f)
        if m:
            out[int(m.group(2))] = f
    return out


def _load(path: str):
    return torch.load(path, map_location="cpu", weights_only=False)


def _partition_state(sd: dict, group: int, path: str) -> dict:
    """The base optimizer's state of flat group ``group`` in one ZeRO file (its partition)."""
    base = sd["base_optimizer_state"]
    if not isinstance(base, dict) or "state" not in base:
        raise ZeroStateError(f"{path}: an 'elastic' ZeRO optimizer state (zero_optimization.elastic_checkpoint); "
                             "msmoe rebuilds the default layout only: resume it at the size it was saved at")
    key = base["param_groups"][group]["params"][0]
    return base["state"].get(key, {})


def plain_states(tag_dir: str, model_states: dict) -> list[dict]:
    """The P plain per-EP-rank optimizer state dicts of the ZeRO 1/2 checkpoint in ``tag_dir``."""
    precision = low_precision_of(model_states)
    if precision is not None:
        raise ZeroStateError(f"{tag_dir} was saved with {precision} weights at ZeRO stage {zero_stage_of(model_states)}: "
                             "its fp32 master weights are partitioned with the optimizer state, and msmoe moves that "
                             "state for fp32 runs only")
    files = zero_files(tag_dir)
    world = int(model_states.get("dp_world_size") or 0)
    if sorted(files) != list(range(world)) or world == 0:
        raise ZeroStateError(f"{tag_dir}: ZeRO optimizer files for data-parallel ranks {sorted(files)}, but the "
                             f"checkpoint was saved by {world} rank(s)")
    shapes = model_states.get("param_shapes")
    if not shapes:
        raise ZeroStateError(f"{tag_dir}: the model file lists no param_shapes: not a ZeRO 1/2 checkpoint")
    sds = [_load(os.path.join(tag_dir, files[r]))["optimizer_state_dict"] for r in range(world)]
    groups = sds[0]["base_optimizer_state"]["param_groups"]
    if len(groups) != len(shapes):
        raise ZeroStateError(f"{tag_dir}: {len(groups)} optimizer param groups but param_shapes for {len(shapes)}")
    ep_sizes = {int(g["name"][len("ep_size_"):]) for g in groups if g.get("moe")}
    if len(ep_sizes) > 1:
        raise ZeroStateError(f"{tag_dir}: expert groups of several EP sizes {sorted(ep_sizes)}")
    ep = ep_sizes.pop() if ep_sizes else 1
    if world % ep:
        raise ZeroStateError(f"{tag_dir}: EP size {ep} does not divide the {world} ranks that saved it")

    out = []
    for e in range(ep):
        state, plain_groups, index = {}, [], 0
        for i, group in enumerate(groups):
            ranks = list(range(e, world, ep)) if group.get("moe") else list(range(world))
            names = list(shapes[i].items())
            for name, shape in names:
                state[index] = _parameter_state(sds, ranks, i, name, tuple(shape), tag_dir, files)
                index += 1
            plain_groups.append({**copy.deepcopy({k: v for k, v in group.items() if k != "params"}),
                                 "params": list(range(index - len(names), index))})
        out.append({"state": state, "param_groups": plain_groups})
    return out


def _parameter_state(sds: list[dict], ranks: list[int], group: int, name: str, shape: tuple, tag_dir: str,
                     files: dict[int, str]) -> dict:
    """One parameter's optimizer state, from its pieces in the partitions of ``ranks`` (in order)."""
    pieces: dict[str, list[torch.Tensor]] = {}
    scalars: dict = {}
    for r in ranks:
        sd = sds[r]
        where = sd["param_slice_mappings"][group].get(name)
        if where is None:
            continue
        for key, value in _partition_state(sd, group, os.path.join(tag_dir, files[r])).items():
            if torch.is_tensor(value) and value.dim() == 1:  # [partition]: the moments
                pieces.setdefault(key, []).append(value.narrow(0, where.start, where.numel))
            else:
                scalars.setdefault(key, copy.deepcopy(value))  # Adam's step: the same in every partition
    numel = math.prod(shape)
    entry = dict(scalars)
    for key, parts in pieces.items():
        flat = torch.cat(parts)
        if flat.numel() != numel:
            raise ZeroStateError(f"{tag_dir}: optimizer state {key!r} of {name} has {flat.numel()} values over the "
                                 f"partitions of ranks {ranks}, but the parameter has shape {list(shape)}")
        entry[key] = flat.clone().view(shape)
    return entry

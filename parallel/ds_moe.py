"""Registering our MoE layers with DeepSpeed's engine.

DeepSpeed recognises an MoE layer by ``isinstance(module, deepspeed.moe.layer.MoE)``; with one
present its engine
  * reduces expert gradients (params with ``allreduce=False``) over the expert-data-parallel
    group named by ``param.group_name`` and dense gradients over the data-parallel group,
  * broadcasts expert weights at start-up within that group only, and
  * saves every expert in its own file named by *global* expert id
    (``layer_<L>_expert_<E>_mp_rank_00_model_states.pt``), found by the state-dict key
    pattern ``.deepspeed_moe.experts.deepspeed_experts.<local id>.``.
:class:`DeepSpeedMoE` is that registration for a :class:`moe.PatchMoE`: it keeps our stacked
expert weights ``[E_local, ...]`` as they are and, only in state dicts, presents them as
per-expert entries (split on save, re-stacked on load).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from deepspeed.moe.layer import MoE as _DeepSpeedMoEBase

from moe import HierarchicalFusion, HierarchicalMoE, MoEOutput, PatchMoE
from parallel.ds_names import EXPERTS_KEY, PER_EXPERT_KEY
from parallel.groups import ExpertGroup, ParallelGroups



class DeepSpeedMoE(_DeepSpeedMoEBase):
    """A PatchMoE as DeepSpeed's engine expects an MoE layer to look. Forward is the layer's."""

    def __init__(self, layer: PatchMoE | HierarchicalMoE | HierarchicalFusion, groups: ParallelGroups):
        nn.Module.__init__(self)  # DeepSpeed's own __init__ builds its gate/experts: not wanted
        num_local = layer.dispatcher.num_local_experts
        num_experts = _num_experts(layer)
        if num_local * groups.ep_size != num_experts:
            raise ValueError(
                f"layer holds {num_local} local experts of {num_experts}, which is not its share over "
                f"ep_size={groups.ep_size} ranks"
            )
        self.deepspeed_moe = layer  # the attribute name DeepSpeed's checkpoint code looks for
        self.ep_size = groups.ep_size
        self.expert_group_name = groups.name
        self.num_experts = num_experts
        self.num_local_experts = num_local
        self.enable_expert_tensor_parallelism = False
        for p in layer.experts.parameters():
            p.allreduce = False
            p.group_name = groups.name
        self.register_state_dict_post_hook(_split_expert_entries)
        self.register_load_state_dict_pre_hook(_stack_expert_entries)

    def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
        """Called by the engine; our groups were built up front and handed in, so only check."""
        from deepspeed.utils import groups as ds_groups

        if self.expert_group_name not in ds_groups._get_expert_parallel_group_dict():
            raise RuntimeError(f"DeepSpeed has no expert group {self.expert_group_name}: build ParallelGroups first")

    def forward(self, x: torch.Tensor, *args) -> MoEOutput:  # type: ignore[override]
        return self.deepspeed_moe(x, *args)


def _num_experts(layer) -> int:
    return layer.cfg.router.num_experts if isinstance(layer, PatchMoE) else layer.cfg.num_experts


def _split_expert_entries(module, state_dict, prefix, local_metadata) -> None:
    """'<p>deepspeed_moe.experts.w' [El, ...] -> '<p>deepspeed_moe.experts.deepspeed_experts.<i>.w'."""
    head = prefix + EXPERTS_KEY
    for key in [k for k in state_dict if k.startswith(head) and not k.startswith(prefix + PER_EXPERT_KEY)]:
        stacked = state_dict.pop(key)
        name = key[len(head):]
        for i in range(stacked.shape[0]):
            state_dict[f"{prefix}{PER_EXPERT_KEY}{i}.{name}"] = stacked[i]


def _stack_expert_entries(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """Inverse of :func:`_split_expert_entries`, before the stacked parameters are loaded."""
    pattern = re.compile(re.escape(prefix + PER_EXPERT_KEY) + r"(\d+)\.(.+)")
    found: dict[str, dict[int, torch.Tensor]] = {}
    for key in list(state_dict):
        m = pattern.fullmatch(key)
        if m:
            found.setdefault(m.group(2), {})[int(m.group(1))] = state_dict.pop(key)
    for name, per_expert in found.items():
        ids = sorted(per_expert)
        if ids != list(range(len(ids))):
            errors.append(f"{prefix}{EXPERTS_KEY}{name}: expert entries {ids} are not 0..{len(ids) - 1}")
            continue
        state_dict[f"{prefix}{EXPERTS_KEY}{name}"] = torch.stack([per_expert[i] for i in ids])


def shard_moe_layers(model: nn.Module, groups: ParallelGroups, counter=None, timer=None,
                     transport=None) -> list[DeepSpeedMoE]:
    """Replace every :class:`PatchMoE` / :class:`HierarchicalMoE` / :class:`HierarchicalFusion` in ``model`` by
    its expert-parallel, DeepSpeed-registered version: same routers and config, this rank's slice of the
    experts, an all-to-all dispatcher over ``groups.ep_group`` (local when ep_size is 1) and ``timer`` (the
    layer's and its dispatcher's: dispatch and combine timed in steps). A :class:`HierarchicalMoE` moves
    its patches as ``transport`` says (parallel/transport.py: flat one-stage, the default, or node-local
    two-stage). A layer whose expert count differs from ``groups.num_experts`` (the head fusion's) is sharded
    over the same ranks by its own count.

    Sharded construction: build ``model`` inside ``moe.experts.experts_on_meta()`` (the same seed on
    every rank): its layers' experts are shapes only, and each shard builds and initialises just this
    rank's experts from the full layer's expert seed, so no rank ever holds all E experts and expert e
    starts the same at every EP size. (A model built with real experts works too: they are dropped.)
    Returns the new layers in model order.
    """
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, (PatchMoE, HierarchicalMoE, HierarchicalFusion))]
    out = []
    for name, full in found:
        wrapped = DeepSpeedMoE(_shard(name, full, groups, counter, timer, transport), groups)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, wrapped)
        out.append(wrapped)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"parameters still on the meta device after sharding: {left[:4]} (only the experts of "
                         f"PatchMoE / HierarchicalMoE / HierarchicalFusion layers may be built on meta)")
    return out


def _shard(name: str, full, groups: ParallelGroups, counter, timer, transport):
    """This rank's shard of layer ``full``: its own experts built here, everything else copied."""
    from parallel.dispatcher import build_dispatcher
    from parallel.transport import FLAT, hierarchical_dispatcher

    e = _num_experts(full)
    if not isinstance(full, HierarchicalFusion) and e != groups.num_experts:
        raise ValueError(f"{name} has num_experts={e} but the parallel groups were built for "
                         f"{groups.num_experts}: build ParallelGroups with the model's expert count")
    ep = groups.ep if e == groups.num_experts else ExpertGroup.of(groups.ep_group, e)
    seed = full.experts.seed
    if isinstance(full, HierarchicalFusion):  # the head is not stage-timed
        layer = HierarchicalFusion(full.cfg, dispatcher=build_dispatcher(ep, counter), expert_seed=seed)
    elif isinstance(full, HierarchicalMoE):
        disp = hierarchical_dispatcher(transport or FLAT, full.cfg, ep, counter, timer)
        layer = HierarchicalMoE(full.cfg, dispatcher=disp, timer=timer, expert_seed=seed)
    else:
        layer = PatchMoE(full.cfg, dispatcher=build_dispatcher(ep, counter, timer), timer=timer, expert_seed=seed)
    with torch.no_grad():
        src = full.state_dict()
        for key, t in layer.state_dict().items():  # routers, scorer, buffers: everything but experts
            if not key.startswith("experts."):
                t.copy_(src[key])
    return layer

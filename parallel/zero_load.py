"""Put a plain optimizer state (the one ZeRO 0 saves per EP rank) into a live ZeRO 1/2 engine.

Each rank of a ZeRO 1/2 engine owns one partition of every flat param group
(parallel/zero_state.py). DeepSpeed links each parameter to its piece of that partition
(``param._hp_mapping``) and sets a whole parameter's optimizer state from its full value with
``deepspeed.utils.safe_set_full_optimizer_state``, which writes the piece this rank owns. Here the
base optimizer's state of each partition is first created (zeros, Adam's step from the source), the
pieces linked to it (DeepSpeed's ``lazy_init_hp_params_optimizer_state``, what the first
``step()`` would do), and then every parameter's moments set from the plain state of this rank's EP
rank, so the state lands in the new partitions whatever the EP or world size it was saved at.

The weights are not here: the caller loads the module first (``load_module_only``: DeepSpeed
then refreshes the fp32 partitions from the module's fp32 weights).
"""

from __future__ import annotations

import copy

import torch

from parallel.zero_state import ZeroStateError


def load_plain_optimizer_state(engine, plain: dict, source: str) -> int:
    """Fill ``engine``'s ZeRO 1/2 optimizer from ``plain`` ({"state", "param_groups"}, indices over
    the param groups in order, tensors shaped like the parameters). Returns the parameters set."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import safe_set_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    zero = engine.optimizer
    if not isinstance(zero, DeepSpeedZeroOptimizer) or zero.cpu_offload:
        raise ZeroStateError(f"this run's optimizer is {type(zero).__name__}"
                             f"{' with CPU offload' if getattr(zero, 'cpu_offload', False) else ''}: msmoe moves "
                             f"optimizer state ({source}) into DeepSpeed's ZeRO 1/2 optimizer of an fp32 run only")
    groups = plain["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    want = [len(g) for g in zero.bit16_groups]
    if sizes != want:
        raise ZeroStateError(f"{source}: optimizer param groups of {sizes} parameters, but this run's model has {want}")
    base = zero.optimizer
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        first = next((plain["state"][idx] for idx in groups[i]["params"] if idx in plain["state"]), {})
        entry = {}
        for key, value in first.items():
            is_moment = torch.is_tensor(value) and value.dim() >= 1
            entry[key] = torch.zeros_like(flat) if is_moment else copy.deepcopy(value)
        base.state[flat] = entry
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], flat, base.state)
    done = 0
    for i, params in enumerate(zero.bit16_groups):
        for param, idx in zip(params, groups[i]["params"]):
            for key, value in plain["state"].get(idx, {}).items():
                if not (torch.is_tensor(value) and value.dim() >= 1):
                    continue
                if value.shape != param.shape:
                    name = zero.param_names.get(param, f"parameter {idx}")
                    raise ZeroStateError(f"{source}: optimizer state {key!r} of {name} has shape {list(value.shape)}, "
                                         f"the parameter {list(param.shape)}: a checkpoint of another model shape")
                safe_set_full_optimizer_state(param, value.to(param.device, torch.float32), key)
            done += 1
    return done

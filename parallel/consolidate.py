"""A DeepSpeed MoE checkpoint as one plain state dict: what a single process without DeepSpeed loads.

A checkpoint tag (any EP size, ZeRO stage 0/1/2 - the module's weights are saved whole in every
case; only optimizer state is partitioned) holds
  mp_rank_00_model_states.pt                        ``module``: every non-expert weight, under
                                                    the wrapper's names (``<layer>.deepspeed_moe.<name>``)
  layer_<L>_expert_<g>_mp_rank_00_model_states.pt   global expert g of MoE layer L, one entry per
                                                    parameter (``<layer>.deepspeed_moe.experts.deepspeed_experts.<g>.<name>``)
:func:`consolidated_state` returns the state dict of the unwrapped model (``<layer>.<name>``), each
MoE layer's expert parameters stacked [E, ...] by global id: the layout of a model built on one
rank. No DeepSpeed import.
"""

from __future__ import annotations

import os

import torch

from common.errors import UserError
from parallel.ds_names import EXPERT_FILE_RE, LAYER_KEY, PER_EXPERT_KEY_RE

MODEL_FILE = "mp_rank_00_model_states.pt"


class ConsolidateError(UserError, ValueError):
    pass


def _load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def consolidated_state(tag_dir: str) -> dict[str, torch.Tensor]:
    """The plain (single-rank) state dict of the model saved in ``tag_dir``."""
    path = os.path.join(tag_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise ConsolidateError(f"{tag_dir} holds no {MODEL_FILE}: not a DeepSpeed checkpoint tag")
    state = {k.replace(LAYER_KEY, ""): v for k, v in _load(path)["module"].items()}
    experts: dict[str, dict[int, torch.Tensor]] = {}  # plain stacked key -> global id -> one expert's tensor
    for name in sorted(os.listdir(tag_dir)):
        if not EXPERT_FILE_RE.fullmatch(name):
            continue
        for key, value in _load(os.path.join(tag_dir, name)).items():
            m = PER_EXPERT_KEY_RE.fullmatch(key)
            if m is None:
                raise ConsolidateError(f"{name}: unexpected key {key!r} in an expert file")
            prefix, expert, param = m.groups()
            experts.setdefault(f"{prefix}experts.{param}", {})[int(expert)] = value
    for key, by_id in experts.items():
        ids = sorted(by_id)
        if ids != list(range(len(ids))):
            raise ConsolidateError(f"{tag_dir}: {key} has experts {ids}, not 0..{len(ids) - 1}: an expert file is missing")
        state[key] = torch.stack([by_id[i] for i in ids])
    return state

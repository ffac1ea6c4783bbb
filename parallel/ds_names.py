"""DeepSpeed's checkpoint naming of MoE layers, defined once: parallel/ds_moe.py registers layers
under these names, parallel/reshard.py reads checkpoints by them. No DeepSpeed import here, so the
command line can load it without DeepSpeed's start-up (and its log lines)."""

import re

LAYER_KEY = "deepspeed_moe."  # the wrapped layer's attribute: DeepSpeed's checkpoint code looks for it
EXPERTS_KEY = LAYER_KEY + "experts."  # our stacked expert parameters [El, ...]
PER_EXPERT_KEY = EXPERTS_KEY + "deepspeed_experts."  # + "<expert id>.<name>": one expert's entry
PER_EXPERT_KEY_RE = re.compile(r"(.*)" + re.escape(PER_EXPERT_KEY) + r"(\d+)\.(.+)")  # (module prefix, id, name)
EXPERT_FILE = "layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"  # one global expert's weights
EXPERT_FILE_RE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")  # (layer, expert)
OPTIM_FILE = "expp_rank_{}_mp_rank_00_optim_states.pt"  # one EP rank's optimizer state (ZeRO 0)
OPTIM_FILE_RE = re.compile(r"expp_rank_(\d+)_mp_rank_00_optim_states\.pt$")  # (EP rank)

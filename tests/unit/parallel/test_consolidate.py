"""A DeepSpeed MoE checkpoint tag as one plain state dict (parallel/consolidate.py), by hand."""

import os

import pytest
import torch

from parallel.consolidate import ConsolidateError, consolidated_state


def _tag(tmp, experts=(0, 1, 2, 3)):
    d = os.path.join(tmp, "step0000002")
    os.makedirs(d)
    module = {"stem.weight": torch.ones(2), "blocks.1.ffn.deepspeed_moe.router.gate.weights.0": torch.full((3,), 2.0)}
    torch.save({"module": module, "num_experts": [4]}, os.path.join(d, "mp_rank_00_model_states.pt"))
    for g in experts:  # global expert g: its weights are g (so the stacking order shows)
        key = f"blocks.1.ffn.deepspeed_moe.experts.deepspeed_experts.{g}."
        torch.save({key + "w1": torch.full((2, 3), float(g)), key + "b1": torch.full((3,), 10.0 + g)},
                   os.path.join(d, f"layer_0_expert_{g}_mp_rank_00_model_states.pt"))
    return d


def test_experts_stacked_by_global_id_and_wrapper_names_removed(tmp_path):
    sd = consolidated_state(_tag(str(tmp_path)))
    assert set(sd) == {"stem.weight", "blocks.1.ffn.router.gate.weights.0", "blocks.1.ffn.experts.w1",
                       "blocks.1.ffn.experts.b1"}
    assert sd["blocks.1.ffn.experts.w1"].shape == (4, 2, 3)
    assert [float(sd["blocks.1.ffn.experts.w1"][g, 0, 0]) for g in range(4)] == [0.0, 1.0, 2.0, 3.0]
    assert torch.equal(sd["blocks.1.ffn.experts.b1"][:, 0], torch.tensor([10.0, 11.0, 12.0, 13.0]))


def test_a_missing_expert_file_is_named(tmp_path):
    with pytest.raises(ConsolidateError, match=r"has experts \[0, 1, 3\], not 0..2"):
        consolidated_state(_tag(str(tmp_path), experts=(0, 1, 3)))

"""Elastic expert parallelism without processes: the EP size a world gets (training/config.py:
``ep_size_for``), a checkpoint's saved layout and when a resume at another layout is refused
(training/checkpoint/elastic.py). The resharding itself runs in tests/integration/test_elastic.py."""

import os

import pytest
import torch

from common.config import ConfigError
from training.checkpoint import elastic
from training.config import TrainConfig
from training.checkpoint.elastic import ElasticError
from training.checkpoint.layout import Layout


def test_fixed_ep_size_must_divide_the_world_and_says_how_to_fix_it():
    tc = TrainConfig(ep_size=4)
    assert tc.ep_size_for(4, 4) == 4 and tc.ep_size_for(8, 4) == 4
    with pytest.raises(ConfigError, match=r"world size 2 is not divisible by train.ep_size=4: choose train.ep_size "
                                          r"in \[1, 2\], or set train.elastic_ep=true"):
        tc.ep_size_for(2, 4)


@pytest.mark.parametrize("world, experts, cap, want", [
    (4, 4, 4, 4), (2, 4, 4, 2), (1, 4, 4, 1), (8, 4, 4, 4), (6, 4, 4, 2), (3, 4, 4, 1), (8, 8, 2, 2), (6, 6, 8, 6)])
def test_elastic_ep_takes_the_largest_size_that_fits_world_and_experts(world, experts, cap, want):
    assert TrainConfig(ep_size=cap, elastic_ep=True).ep_size_for(world, experts) == want


def _checkpoint(tag_dir, zero, **client):
    os.makedirs(tag_dir)
    torch.save({"module": {}, "ds_config": {"zero_optimization": {"stage": zero}}, "dp_world_size": 2, **client},
               os.path.join(tag_dir, elastic.MODEL_FILE))


def test_saved_layout_from_client_state_and_from_deepspeed_files(tmp_path):
    _checkpoint(str(tmp_path / "a"), 1, ep_size=4, world_size=4)
    assert elastic.saved_layout(str(tmp_path / "a")) == Layout(4, 4, 1)
    _checkpoint(str(tmp_path / "b"), 0, ep_size=4)  # ZeRO 0: the optimizer files per EP rank (after a convert)
    for r in range(2):
        torch.save({}, str(tmp_path / "b" / f"expp_rank_{r}_mp_rank_00_optim_states.pt"))
    assert elastic.saved_layout(str(tmp_path / "b")) == Layout(2, 2, 0)
    _checkpoint(str(tmp_path / "c"), 1)  # ZeRO: the expert group's name in the partition of rank 0
    groups = [{"name": "dense"}, {"name": "ep_size_2", "moe": True}]
    torch.save({"optimizer_state_dict": {"base_optimizer_state": {"param_groups": groups}}},
               str(tmp_path / "c" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert elastic.saved_layout(str(tmp_path / "c")) == Layout(2, 2, 1)


def test_only_a_low_precision_zero_1_2_checkpoint_at_another_layout_is_refused(tmp_path):
    """fp32 ZeRO 1/2 checkpoints move to any EP / world size / stage (their state is rebuilt from the
    partitions); bf16/fp16 ones keep fp32 master weights in the partitions and are refused, naming both
    layouts and two fixes that work (the saved layout, or --init-from)."""
    ok = [(Layout(4, 4, 0), Layout(2, 2, 0)), (Layout(2, 2, 0), Layout(2, 4, 0)), (Layout(2, 2, 1), Layout(2, 2, 1)),
          (Layout(2, 2, 1), Layout(1, 1, 1)), (Layout(2, 2, 2), Layout(1, 2, 0)), (Layout(2, 2, 1), Layout(2, 2, 0))]
    for saved, run in ok:
        assert elastic.refusal("step0000002", "ck", saved, run) is None
    assert elastic.refusal("t", "ck", Layout(2, 2, 1), Layout(2, 2, 1), "bf16") is None  # the same layout loads as is
    assert elastic.refusal("t", "ck", Layout(2, 2, 0), Layout(1, 1, 0), "bf16") is None  # ZeRO 0: reshard.py decides
    msg = elastic.refusal("step0000002", "ck", Layout(2, 2, 1), Layout(1, 1, 1), "bf16")
    assert "saved at EP=2 on 2 rank(s), ZeRO stage 1 with bf16 weights; this run is EP=1 on 1 rank(s)" in msg
    assert "train.ep_size=2 train.zero_stage=1, --nproc 2" in msg and "--init-from ck name=<new name>" in msg
    _checkpoint(str(tmp_path / "step0000002"), 1, ep_size=2, world_size=2)
    torch.save({"module": {}, "ds_config": {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}},
                "dp_world_size": 2, "ep_size": 2, "world_size": 2},
               str(tmp_path / "step0000002" / elastic.MODEL_FILE))
    with pytest.raises(ElasticError, match="with bf16 weights"):
        elastic.ElasticResume(Layout(1, 1, 1), rank=0).prepare(str(tmp_path), "step0000002")

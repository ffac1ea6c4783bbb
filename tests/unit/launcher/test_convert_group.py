"""``msmoe convert --group G --num-experts N`` (launcher/convert.py) on a hand-made checkpoint with
a hierarchical MoE block and a head's MoE layer: the layout comes from the run's config.yaml, the
head's layer is untouched, the converted block loads with the printed overrides."""

import argparse
import filecmp
import json
import os

import pytest
import torch
import yaml

from common.config import ConfigError
from launcher.convert import run_convert
from moe.hierarchical import expert_id_table
from parallel.ds_names import EXPERT_FILE
from parallel.reshard import ReshardError
from tests.unit.parallel.test_resize_checkpoint import TAG, fusion_layer, hier, read_layer, write_checkpoint


def _args(tmp, **kw):
    base = dict(src=f"{tmp}/src", out=f"{tmp}/out", tag=TAG, ep_size=None, num_experts=None, group=None,
                config=None, mode="upcycle", noise=0.0, score_fn=None, usage=None, seed=0)
    base.update(kw)
    return argparse.Namespace(**base)


def _run_config(tmp, sizes=(2, 3, 2), top_k=1, placement="grouped"):
    path = f"{tmp}/config.yaml"
    with open(path, "w") as fh:
        yaml.safe_dump({"model": {"dim": 8, "depth": 2, "moe_blocks": [1], "moe_kind": "hierarchical",
                                  "hierarchical": {"num_groups": 3, "experts_per_group": list(sizes),
                                                   "placement": placement, "coarse": {"num_experts": 3, "top_k": 2},
                                                   "fine": {"num_experts": max(sizes), "top_k": top_k}}}}, fh)
    return path


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    block = hier((2, 3, 2), "grouped")
    write_checkpoint(str(tmp_path / "src"), {"blocks.1.ffn.": block, "fusion.moe.": fusion_layer()},
                     {"stem.weight": torch.randn(2)})
    return str(tmp_path), block


def test_prune_one_group(ckpt, capsys):
    tmp, block = ckpt
    usage = [1, 1, 7, 0, 9, 5, 5]  # group 1 = experts 2, 3, 4 (grouped): keep f = 0 and 2
    with open(f"{tmp}/summary.json", "w") as fh:
        json.dump({"expert_load": {"block1": {"whole_run": usage}}}, fh)
    assert run_convert(_args(tmp, group=1, num_experts=2, mode="prune", config=_run_config(tmp),
                             usage=f"{tmp}/summary.json")) == 0
    assert "model.hierarchical.experts_per_group=2 model.hierarchical.fine.num_experts=2" in capsys.readouterr().out
    sd, model = read_layer(f"{tmp}/out/{TAG}", 0, "blocks.1.ffn.")
    assert model["num_experts"] == [6, 4]
    old, new = expert_id_table((2, 3, 2), "grouped"), expert_id_table((2, 2, 2), "grouped")
    for name, w in block.experts.named_parameters():
        for g, kept in ((0, [0, 1]), (1, [0, 2]), (2, [0, 1])):
            for f, k in enumerate(kept):
                assert torch.equal(sd[f"experts.{name}"][new[g][f]], w[old[g][k]]), (name, g, f)
    for g in range(4):
        name = EXPERT_FILE.format(layer=1, expert=g)
        assert filecmp.cmp(f"{tmp}/src/{TAG}/{name}", f"{tmp}/out/{TAG}/{name}", shallow=False)
    assert os.path.isfile(f"{tmp}/out/latest")


def test_group_needs_the_run_config_and_fitting_sizes(ckpt):
    tmp, _ = ckpt
    with pytest.raises(ReshardError, match="--group resizes one group of hierarchical MoE blocks: give --config"):
        run_convert(_args(tmp, group=0, num_experts=4))
    with pytest.raises(ReshardError, match="blocks.1.ffn. is a hierarchical MoE layer: give --config"):
        run_convert(_args(tmp, num_experts=4))
    with open(f"{tmp}/summary.json", "w") as fh:
        json.dump({"expert_load": {"block1": {"whole_run": [1] * 7}}}, fh)
    with pytest.raises(ConfigError, match="fine.top_k=2 is larger than the smallest group"):
        run_convert(_args(tmp, group=0, num_experts=1, mode="prune", config=_run_config(tmp, top_k=2),
                          usage=f"{tmp}/summary.json"))
    with pytest.raises(ReshardError, match=r"experts_per_group=\[2, 2, 2\] \(6\): give the config of the run"):
        run_convert(_args(tmp, group=0, num_experts=4, config=_run_config(tmp, sizes=(2, 2, 2))))

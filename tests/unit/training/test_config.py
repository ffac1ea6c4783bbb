"""The run configs (training/config.py): overrides, errors, the LR schedule and the ablation configs."""

import glob
import os

import pytest

from common.config import ConfigError
from tests.helpers import ROOT
from training.config import RunConfig, load_config


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["train.steps=7", "model.patch_moe.router.top_k=1"])
    assert cfg.train.steps == 7 and cfg.model.patch_moe_config().router.top_k == 1
    assert cfg.name == "tiny" and cfg.model.dim == 32  # tiny overrides default
    assert cfg.model.patch_moe_config().router.num_experts == 4  # inherited from default.yaml
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stpes'\] in train"):
        load_config(None, ["train.stpes=3"])
    with pytest.raises(ConfigError, match="num_experts=3 is not divisible by train.ep_size=2"):
        load_config(None, ["model.patch_moe.router.num_experts=3", "train.ep_size=2"])
    with pytest.raises(ConfigError, match="top_k=9 is larger than num_experts=4"):
        load_config(None, ["model.patch_moe.router.top_k=9"])
    with pytest.raises(ConfigError, match="model.moe_blocks=\\[5\\]"):
        load_config(None, ["model.moe_blocks=[5]"])
    with pytest.raises(ConfigError, match="train.k=1 must be >= 2"):
        load_config(None, ["train.k=1"])
    with pytest.raises(ConfigError, match="train.lr='fast' must be a number"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    orphan = tmp_path / "mine.yaml"  # a config copied without the base it names
    orphan.write_text("base: default.yaml\nname: mine\n")
    with pytest.raises(ConfigError, match=r"mine.yaml' says base: default.yaml, but .*default.yaml' does not exist"):
        load_config(str(orphan))
    loop = tmp_path / "a.yaml"
    loop.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(str(loop))


def test_lr_schedule_depends_on_step_only():
    t = RunConfig().train
    assert t.lr_at(0) == pytest.approx(t.lr / t.warmup_steps)
    assert t.lr_at(t.warmup_steps) == pytest.approx(t.lr)
    assert t.lr_at(t.steps) == pytest.approx(t.lr * t.min_lr_ratio)


ABLATIONS = sorted(glob.glob(os.path.join(ROOT, "configs/ablations/*.yaml")))


def test_seed_ablation_plan_is_complete():
    """The thesis's ablation plan for the multi-scale fusion: 2/3/4/5 scale experts, gate depth
    1/2/3, temperature 0.5/1/2."""
    got = {"scales": set(), "gate_depth": set(), "temperature": set()}
    for path in ABLATIONS:
        ms = load_config(path).model.multiscale_config()
        got["scales"].add(len(ms.scales))
        got["gate_depth"].add(ms.gate_depth)
        got["temperature"].add(ms.temperature)
    assert {2, 3, 4, 5} <= got["scales"]
    assert {1, 2, 3} <= got["gate_depth"]
    assert {0.5, 1.0, 2.0} <= got["temperature"]
    seed = [p for p in ABLATIONS if load_config(p).model.streams == "fused" and "routing_" not in p]
    assert len(seed) == 10  # the others: modality streams, and the routing set below


def test_routing_ablation_set_is_expert_vs_token_at_equal_active_flops():
    """msmoe ablate --set routing: expert and token choice at E = 4, 16, 64, all top-2 with the same
    expert width, so every patch passes through 2 experts on average in every row."""
    from scaling.ablation import ROUTING_CONFIGS

    seen = set()
    for path in ROUTING_CONFIGS:
        pm = load_config(os.path.join(ROOT, path)).model.patch_moe_config()
        seen.add((pm.router.choice, pm.router.num_experts))
        assert pm.router.top_k == 2 and pm.expert.hidden_dim == load_config(
            os.path.join(ROOT, "configs/default.yaml")).model.patch_moe_config().expert.hidden_dim
    assert seen == {(c, e) for c in ("token", "expert") for e in (4, 16, 64)}


def test_profile_steps_and_wandb_project_are_checked_up_front():
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["train.profile_steps=[3,5]"])
    assert cfg.train.profile_steps == (3, 5) and RunConfig().train.profile_steps is None
    assert load_config(None, ["train.steps=4", "train.profile_steps=[4,4]"]).train.profile_steps == (4, 4)
    for bad in ("[5,3]", "[0,2]", "[2,21]", "5", "[1,2,3]"):
        with pytest.raises(ConfigError, match=r"train.profile_steps=.* must be \[a, b\] with 1 <= a <= b <= "
                                              r"train.steps=20"):
            load_config(os.path.join(ROOT, "configs/tiny.yaml"), [f"train.profile_steps={bad}"])
    for bad, kind in (("[1.5,2]", "1.5 is a decimal number"), ("[true,2]", "True is a boolean")):
        with pytest.raises(ConfigError, match=rf"train.profile_steps=\[.*\] must be a list of integers: {kind}"):
            load_config(os.path.join(ROOT, "configs/tiny.yaml"), [f"train.profile_steps={bad}"])
    with pytest.raises(ConfigError, match="train.wandb_project=3 must be text, not an integer"):
        load_config(None, ["train.wandb_project=3"])


@pytest.mark.parametrize("override, message", [
    ("train.steps=5.7", "train.steps=5.7 must be an integer (a whole number), not a decimal number"),
    ("train.keep_last=1.5", "train.keep_last=1.5 must be an integer (a whole number), not a decimal number"),
    ("train.keep_last=2.0", "train.keep_last=2.0 must be an integer (a whole number), not a decimal number: "
                            "write train.keep_last=2"),
    ("train.elastic_ep=maybe", "train.elastic_ep='maybe' must be true or false, not text"),
    ("eval.untrained=1", "eval.untrained=1 must be true or false, not an integer"),
    ("train.steps=true", "train.steps=True must be an integer (a whole number), not a boolean"),
    ("train.steps=null", "train.steps=None must be an integer (a whole number), not null"),
    ("model.moe_blocks=[1.0]", "model.moe_blocks=[1.0] must be a list of integers: 1.0 is a decimal number"),
    ("model.patch_moe.router.num_experts=4.0", "model.patch_moe.router.num_experts=4.0 must be an integer"),
    ("model.patch_moe.router.k_max=2.5", "model.patch_moe.router.k_max=2.5 must be an integer"),
    ("model.patch_moe.capacity_factor=big", "model.patch_moe.capacity_factor='big' must be a number, not text"),
    ("data.synth.num_cameras=2.5", "data.synth.num_cameras=2.5 must be an integer"),
    ("out_dir=5", "out_dir=5 must be text, not an integer: quote it (out_dir='5')"),
    ("name=[a]", "name=['a'] must be text, not a list"),
])
def test_counts_are_integers_and_switches_booleans_in_every_section(override, message):
    """Each config family (training, reid's model and data, moe's layers) goes through the one builder."""
    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(ROOT, "configs/tiny.yaml"), [override])
    assert message in str(err.value)


def test_a_float_count_is_refused_where_an_int_one_passes():
    with pytest.raises(ConfigError, match=r"train.steps=6.0 must be an integer .*: write train.steps=6"):
        load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["train.steps=6.0"])
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"),
                      ["train.steps=6", "train.elastic_ep=true", "train.lr=1", "model.patch_moe.capacity_factor=null",
                       "model.patch_moe.router.k_max=null"])
    assert cfg.train.steps == 6 and cfg.train.elastic_ep is True
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # an int is widened where a float is declared


def test_node_local_transport_is_for_grouped_hierarchical_blocks():
    hier = os.path.join(ROOT, "configs/hierarchical.yaml")
    assert load_config(hier).train.transport == "flat"
    assert load_config(hier, ["train.transport=node_local"]).train.transport == "node_local"
    with pytest.raises(ConfigError, match=r"train.transport='node_local' moves the patches of HierarchicalMoE "
                                          r"blocks, but model.moe_kind='patch': set model.moe_kind=hierarchical"):
        load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["train.transport=node_local"])
    with pytest.raises(ConfigError, match=r"model.hierarchical.placement='spread' interleaves them over the ranks: "
                                          r"set model.hierarchical.placement=grouped, or train.transport=flat"):
        load_config(hier, ["train.transport=node_local", "model.hierarchical.placement=spread"])
    with pytest.raises(ConfigError, match=r"model.hierarchical.fine.choice='expert' has the fine experts pick from "
                                          r"the whole batch: set model.hierarchical.fine.choice=token"):
        load_config(hier, ["train.transport=node_local", "model.hierarchical.fine.choice=expert",
                           "model.hierarchical.capacity_factor=1.0"])
    with pytest.raises(ConfigError, match=r"train.transport='ring' is not one of the allowed values"):
        load_config(hier, ["train.transport=ring"])


def test_an_elastic_node_local_run_takes_the_largest_ep_size_node_local_can_serve():
    """Groups 6,3,3 (12 experts) on 3 nodes of 2 after losing one: EP=6 would split group 0 over two
    nodes (4 experts per node), EP=2 keeps it whole; a flat run takes 6."""
    hier = ["model.hierarchical.experts_per_group=[6,3,3]", "model.hierarchical.fine.num_experts=6",
            "train.ep_size=12", "train.elastic_ep=true"]
    path = os.path.join(ROOT, "configs/hierarchical.yaml")
    assert load_config(path, hier).ep_size_at(6, 2) == 6
    node_local = load_config(path, [*hier, "train.transport=node_local"])
    assert node_local.ep_size_at(6, 2) == 2 and node_local.ep_size_at(8, 2) == 4
    assert node_local.ep_size_at(3, 2) == 3  # none it can serve (3 ranks, nodes of 2): the usual rule, refused by name
    assert load_config(path, ["train.ep_size=4", "train.transport=node_local"]).ep_size_at(4, 2) == 4  # not elastic

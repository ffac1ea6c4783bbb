import pytest

from common.config import ConfigError, from_dict
from moe.config import ExpertConfig, MultiScaleMoEConfig, PatchMoEConfig, RouterConfig


def test_top_k_larger_than_experts_names_both_numbers():
    with pytest.raises(ConfigError, match=r"top_k=5 .*num_experts=4"):
        RouterConfig(num_experts=4, top_k=5)


def test_dynamic_k_bounds_and_score_fn():
    with pytest.raises(ConfigError, match=r"k_max=9 .*num_experts=8"):
        RouterConfig(num_experts=8, dynamic_top_p=0.5, k_max=9)
    with pytest.raises(ConfigError, match="dynamic_top_p needs score_fn='softmax'"):
        RouterConfig(num_experts=8, dynamic_top_p=0.5, score_fn="sigmoid")
    with pytest.raises(ConfigError, match=r"dynamic_top_p=1.5"):
        RouterConfig(num_experts=8, dynamic_top_p=1.5)
    assert RouterConfig(num_experts=8, dynamic_top_p=0.5, k_max=3).max_k == 3
    assert RouterConfig(num_experts=8, dynamic_top_p=0.5).max_k == 8
    assert RouterConfig(num_experts=8, top_k=3).max_k == 3


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(score_fn="relu"), "score_fn='relu'"),
        (dict(temperature=0.0), "temperature=0.0"),
        (dict(gate_depth=4), "gate_depth=4"),
        (dict(num_heads=0), "num_heads=0"),
        (dict(noise="dropout"), "noise='dropout'"),
    ],
)
def test_router_fields_are_named(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        RouterConfig(num_experts=4, **kwargs)


def test_patch_config_errors():
    r = RouterConfig(num_experts=4)
    with pytest.raises(ConfigError, match="capacity_factor=0"):
        PatchMoEConfig(dim=8, router=r, capacity_factor=0)
    with pytest.raises(ConfigError, match="patch_size >= 2"):
        PatchMoEConfig(dim=8, router=r, expert=ExpertConfig(kind="conv"), patch_size=1)
    with pytest.raises(ConfigError, match="expert.kind='moe'"):
        ExpertConfig(kind="moe")
    with pytest.raises(ConfigError, match=r"scales=\[4, 4\]"):
        MultiScaleMoEConfig(dim=8, scales=(4, 4))


def test_from_dict_nested_and_unknown_keys():
    cfg = from_dict(PatchMoEConfig, {"dim": 16, "patch_size": 4,
                                     "router": {"num_experts": 8, "top_k": 2},
                                     "expert": {"kind": "ffn", "hidden_dim": 32}})
    assert cfg.router.num_experts == 8 and cfg.expert.kind == "ffn" and cfg.patch_size == 4
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['topk'\] in router"):
        from_dict(PatchMoEConfig, {"dim": 16, "router": {"num_experts": 8, "topk": 2}})
    with pytest.raises(ConfigError, match="top_k=9 is larger than num_experts=8"):
        from_dict(PatchMoEConfig, {"dim": 16, "router": {"num_experts": 8, "top_k": 9}})
    with pytest.raises(ConfigError, match="PatchMoEConfig"):
        from_dict(PatchMoEConfig, {"router": {"num_experts": 8}})


def test_from_dict_checks_each_value_against_its_annotation():
    with pytest.raises(ConfigError, match=r"^router.top_k=2.0 must be an integer \(a whole number\), not a decimal "
                                          r"number: write router.top_k=2$"):
        from_dict(PatchMoEConfig, {"dim": 16, "router": {"num_experts": 8, "top_k": 2.0}})
    with pytest.raises(ConfigError, match=r"^router.normalize_topk='yes please' must be true or false, not text$"):
        from_dict(PatchMoEConfig, {"dim": 16, "router": {"num_experts": 8, "normalize_topk": "yes please"}})
    with pytest.raises(ConfigError, match=r"^scales=\[4, 8.5\] must be a list of integers: 8.5 is a decimal number$"):
        from_dict(MultiScaleMoEConfig, {"dim": 16, "scales": [4, 8.5]})
    with pytest.raises(ConfigError, match=r"^router.dynamic_top_p=True must be a number, not a boolean$"):
        from_dict(PatchMoEConfig, {"dim": 16, "router": {"num_experts": 8, "dynamic_top_p": True}})
    cfg = from_dict(PatchMoEConfig, {"dim": 16, "capacity_factor": None, "router": {"num_experts": 8, "k_max": None,
                                                                                   "temperature": 2}})
    assert cfg.capacity_factor is None and cfg.router.temperature == 2.0 and isinstance(cfg.router.temperature, float)

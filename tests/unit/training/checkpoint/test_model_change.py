"""Which model fields a resumed config changes, and whether the parameter shapes follow
(training/checkpoint/model_change.py; the refusal itself runs through the CLI in tests/integration/test_model_change.py)."""

from training.config import load_config
from training.checkpoint.model_change import changes, parameter_shapes


def _model(path, *overrides):
    return load_config(path, list(overrides)).model


def test_changes_are_named_as_set_and_shapes_decide_what_can_load():
    tiny = _model("configs/tiny.yaml")
    top1 = _model("configs/tiny.yaml", "model.patch_moe.router.top_k=1")
    assert changes(tiny, top1) == {"model.patch_moe.router.top_k": (2, 1)}
    assert parameter_shapes(tiny) == parameter_shapes(top1)
    wide = _model("configs/tiny.yaml", "model.dim=48")
    assert changes(tiny, wide) == {"model.dim": (32, 48)}  # not the sub-configs' dim that follows it
    more = _model("configs/tiny.yaml", "model.patch_moe.router.num_experts=8")
    assert parameter_shapes(tiny) != parameter_shapes(more)
    # a default written out is no change; nor is a sub-config the model does not use
    assert changes(tiny, _model("configs/tiny.yaml", f"model.mlp_ratio={tiny.mlp_ratio}")) == {}
    assert changes(tiny, _model("configs/tiny.yaml", "model.hierarchical.fine.top_k=1")) == {}


def test_hierarchical_models_compare_too():
    h = _model("configs/hierarchical.yaml")
    k1 = _model("configs/hierarchical.yaml", "model.hierarchical.fine.top_k=1")
    assert changes(h, k1) == {"model.hierarchical.fine.top_k": (2, 1)}
    assert parameter_shapes(h) == parameter_shapes(k1)  # an op without a meta kernel: built for real
    e8 = _model("configs/hierarchical.yaml", "model.hierarchical.experts_per_group=8",
                "model.hierarchical.fine.num_experts=8")
    assert parameter_shapes(h) != parameter_shapes(e8)

"""parallel/reshard.py: resize_experts_checkpoint on a hand-made DeepSpeed MoE checkpoint: only the
backbone blocks' layers change; another MoE layer (a head's, "fusion.") keeps its files byte for
byte, its keys and its expert count; num_experts is written per layer."""

import filecmp
import os

import torch

from moe import ExpertConfig, HierarchicalMoE, HierarchicalMoEConfig, PatchMoE, PatchMoEConfig, RouterConfig
from moe.resize import resize_group_state
from parallel.ds_names import EXPERT_FILE, LAYER_KEY, PER_EXPERT_KEY
from parallel.reshard import resize_experts_checkpoint

TAG = "step0000006"


def hier(sizes, placement="spread"):
    return HierarchicalMoE(HierarchicalMoEConfig(
        dim=8, patch_size=4, num_groups=len(sizes), experts_per_group=tuple(sizes), placement=placement,
        coarse=RouterConfig(num_experts=len(sizes), top_k=2), fine=RouterConfig(num_experts=max(sizes), top_k=2),
        expert=ExpertConfig(kind="ffn", hidden_dim=16, dropout=0.0)))


def fusion_layer():
    return PatchMoE(PatchMoEConfig(dim=8, patch_size=4, router=RouterConfig(num_experts=4, top_k=1),
                                   expert=ExpertConfig(kind="ffn", hidden_dim=16, dropout=0.0)))


def write_checkpoint(root, layers: dict[str, torch.nn.Module], dense: dict) -> str:
    """DeepSpeed's layout: dense keys in the model file, one file per (layer, global expert)."""
    step = os.path.join(root, TAG)
    os.makedirs(step)
    module, counts = dict(dense), []
    for layer, (path, m) in enumerate(layers.items()):
        sd = m.state_dict()
        experts = {k[len("experts."):]: v for k, v in sd.items() if k.startswith("experts.")}
        e = next(iter(experts.values())).shape[0]
        counts.append(e)
        module.update({path + LAYER_KEY + k: v for k, v in sd.items() if not k.startswith("experts.")})
        for g in range(e):
            torch.save({f"{path}{PER_EXPERT_KEY}{g}.{n}": w[g].clone() for n, w in experts.items()},
                       os.path.join(step, EXPERT_FILE.format(layer=layer, expert=g)))
    torch.save({"module": module, "num_experts": counts}, os.path.join(step, "mp_rank_00_model_states.pt"))
    with open(os.path.join(root, "latest"), "w") as fh:
        fh.write(TAG)
    return step


def read_layer(step, layer, path):
    """The layer's state dict back from a checkpoint (experts re-stacked by global id)."""
    model = torch.load(os.path.join(step, "mp_rank_00_model_states.pt"), weights_only=False)
    sd = {k[len(path + LAYER_KEY):]: v for k, v in model["module"].items() if k.startswith(path + LAYER_KEY)}
    files = sorted((int(f.split("_")[3]), f) for f in os.listdir(step) if f.startswith(f"layer_{layer}_expert_"))
    per = [torch.load(os.path.join(step, f), weights_only=False) for _, f in files]
    names = [k.rsplit(".", 1)[1] for k in per[0]]
    for n in names:
        sd[f"experts.{n}"] = torch.stack([p[f"{path}{PER_EXPERT_KEY}{g}.{n}"] for g, p in enumerate(per)])
    return sd, model


def test_only_the_blocks_layers_are_resized(tmp_path):
    torch.manual_seed(0)
    block, head = hier((2, 2, 2)).eval(), fusion_layer().eval()
    dense = {"stem.weight": torch.randn(3, 3), "head.bias": torch.randn(5)}
    src = write_checkpoint(str(tmp_path / "src"), {"blocks.1.ffn.": block, "fusion.moe.": head}, dense)
    seen = []

    def transform(state, num_experts, module_prefix):
        seen.append((module_prefix, num_experts))
        return resize_group_state(state, (2, 2, 2), "spread", 0, 4, mode="upcycle")[0]

    info = resize_experts_checkpoint(str(tmp_path / "src"), TAG, str(tmp_path / "out"), transform)
    out = os.path.join(str(tmp_path / "out"), TAG)
    assert seen == [("blocks.1.ffn.", 6)]  # the head's layer is never handed to the transform
    assert info["num_experts"] == [8, 4] and info["resized"] == {"blocks.1.ffn.": (6, 8)}
    # the head's expert files: byte for byte; its keys and the dense keys: as they were
    for g in range(4):
        name = EXPERT_FILE.format(layer=1, expert=g)
        assert filecmp.cmp(os.path.join(src, name), os.path.join(out, name), shallow=False)
    assert not os.path.exists(os.path.join(out, EXPERT_FILE.format(layer=1, expert=4)))
    assert len([f for f in os.listdir(out) if f.startswith("layer_0_expert_")]) == 8
    old = torch.load(os.path.join(src, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    sd, model = read_layer(out, 0, "blocks.1.ffn.")
    assert model["num_experts"] == [8, 4]
    for k, v in old.items():
        if not k.startswith("blocks.1.ffn.deepspeed_moe.fine.0."):
            assert torch.equal(model["module"][k], v), k
    # the resized layer loads into [4, 2, 2] groups and computes what the [2, 2, 2] layer did
    big = hier((4, 2, 2)).eval()
    big.load_state_dict(sd)
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(big(x).out, block(x).out, rtol=1e-5, atol=1e-6)

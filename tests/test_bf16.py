"""bf16 training: fp32 accumulation where many rows meet, and the whole model in DeepSpeed's bf16.

Bounds (stated once, used below):
  GRAD_RTOL      relative L2 error of a bf16 layer's parameter gradients against float64 when
                 thousands of rows feed one expert's bias / LayerNorm affine (bf16 keeps 8 bits:
                 one rounding is 2^-9 relative; a few roundings per path stay well under 3e-2)
  LOSS_ATOL      |bf16 loss - fp32 loss| per step over the first steps of the tiny model
"""

import pytest
import torch

from moe.experts import ConvExperts, FFNExperts, ResidualMLPExperts
from moe.indexing import scatter_add_rows
from test_train import _eval, _summary, _train

GRAD_RTOL = 3e-2
LOSS_ATOL = 0.1


def test_low_precision_row_sums_accumulate_in_fp32():
    # 8192 rows of ~1 into one row: a running bf16 sum stops near 256 (spacing 2 there: +1 rounds away).
    g = (1 + 0.01 * torch.randn(8192, 3)).bfloat16()
    idx = torch.zeros(8192, dtype=torch.long)
    exact = g.double().sum(0)
    out = scatter_add_rows(g, idx, 1)
    assert out.dtype == torch.bfloat16
    assert ((out[0].double() - exact).abs() / exact).max() < 2 ** -7
    running = torch.zeros(3, dtype=torch.bfloat16)
    for row in g[:1024]:
        running += row  # what per-row bf16 accumulation does (CUDA's atomic index_add_ on bf16)
    assert ((running.double() - g[:1024].double().sum(0)).abs() / 1024).max() > 0.5  # the bound can fail


def _experts(kind, impl, e, c, f):
    if kind == "seed":
        return ResidualMLPExperts(e, c, f, dropout=0.0, impl=impl)
    return (FFNExperts if kind == "ffn" else ConvExperts)(e, c, f, impl=impl)


@pytest.mark.parametrize("kind,impl", [("seed", "bmm"), ("seed", "grouped_mm"), ("ffn", "bmm"), ("ffn", "fused"),
                                       ("ffn", "grouped_mm"), ("conv", "bmm")])
def test_bf16_expert_gradients_with_thousands_of_rows_per_expert(kind, impl):
    torch.manual_seed(0)
    e, c, f = 2, 16, 32
    l = 4 if kind == "conv" else 1  # conv experts need whole 2x2 patches
    units = 8192 // l
    counts = torch.tensor([units - 16, 16])
    x = torch.randn(units, l, c)
    g = 1 + 0.1 * torch.randn(units, l, c)  # same-signed: the sums grow large, as bias gradients do
    ref = _experts(kind, impl if impl != "grouped_mm" else "bmm", e, c, f).double()
    (ref(x.double(), counts) * g.double()).sum().backward()
    low = _experts(kind, impl, e, c, f)
    low.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    low = low.bfloat16()
    (low(x.bfloat16(), counts).float() * g).sum().backward()
    for (name, p_ref), p_low in zip(ref.named_parameters(), low.parameters()):
        assert p_low.grad.dtype == torch.bfloat16
        err = float((p_low.grad.double() - p_ref.grad).norm() / p_ref.grad.norm())
        assert err < GRAD_RTOL, (kind, impl, name, err)


@pytest.mark.slow
def test_tiny_model_trains_in_bf16_at_ep2_close_to_fp32_and_evaluates_from_its_checkpoint(tmp_path):
    tmp = str(tmp_path)
    common = ("train.ep_size=2", "train.steps=8", "eval.untrained=false")
    _train(tmp, "fp32", 2, *common)
    for zero in (0, 1, 2):
        _train(tmp, f"bf16_z{zero}", 2, *common, "train.precision=bf16", f"train.zero_stage={zero}")
    ref = _summary(tmp, "fp32")["loss_history"]
    for zero in (0, 1, 2):
        s = _summary(tmp, f"bf16_z{zero}")
        losses = s["loss_history"]
        assert len(losses) == 8 and all(abs(a - b) < LOSS_ATOL for a, b in zip(losses, ref)), (zero, losses, ref)
        assert losses[-1] < losses[0]  # it learns
        assert s["skipped_steps"] == []
    ev = _eval(tmp, "bf16_z1", nproc=2)
    s = _summary(tmp, "bf16_z1")
    assert ev["step"] == 8 and abs(ev["map"] - s["map"]) < 1e-6


@pytest.mark.slow
def test_gpu_config_runs_a_few_steps_shrunk(tmp_path):
    """configs/gpu.yaml as written (bf16, ZeRO 1, seed experts, 4 MoE blocks), only smaller: 2 ranks."""
    tmp = str(tmp_path)
    shrink = ("data.synth={num_train_ids: 24, num_test_ids: 8, num_cameras: 3, images_per_camera: 3, "
              "height: 64, width: 32}", "model.dim=32", "model.stem_stride=4", "model.patch_moe.patch_size=4",
              "model.patch_moe.expert.hidden_dim=32", "model.patch_moe.router.num_experts=4", "train.ep_size=2",
              "train.steps=3", "train.p=8", "train.k=2", "train.warmup_steps=1", "eval.untrained=false",
              "eval.batch_size=32")
    _train(tmp, "gpu_small", 2, *shrink, config="configs/gpu.yaml")
    s = _summary(tmp, "gpu_small")
    assert s["config"]["train"]["precision"] == "bf16" and s["config"]["train"]["zero_stage"] == 1
    assert s["moe_layers"] == 4 and s["steps"] == 3 and all(x == x for x in s["loss_history"])

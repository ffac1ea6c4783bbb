"""Model cost and expert usage (training/report/model_cost.py, training/metrics.moe_usage) against hand counts."""

import numpy as np
import pytest
import torch

from common import compat
from moe import ExpertConfig, HierarchicalMoE, HierarchicalMoEConfig, PatchMoE, PatchMoEConfig, RouterConfig
from tests.helpers import needs_cpu_grouped_mm
from training.metrics.records import History
from training.report.summary import moe_usage
from training.report.model_cost import count_flops, parameter_counts


def test_parameters_total_and_active_per_patch():
    c, f, e, k = 16, 32, 4, 2
    layer = PatchMoE(PatchMoEConfig(dim=c, patch_size=4, router=RouterConfig(num_experts=e, top_k=k),
                                    expert=ExpertConfig(kind="ffn", hidden_dim=f, dropout=0.0)))
    model = torch.nn.Sequential(torch.nn.Linear(c, c), layer)
    per_expert = c * f + f + f * c + c  # w1, b1, w2, b2
    dense = (c * c + c) + (c * e + e)  # the Linear and the router's gate
    assert parameter_counts(model, [layer], ep_size=1) == {
        "total": dense + e * per_expert, "dense": dense, "experts": e * per_expert,
        "active_per_patch": dense + k * per_expert}
    # under EP=2 a rank holds half the experts: the total still counts all of them
    half = PatchMoE(PatchMoEConfig(dim=c, patch_size=4, router=RouterConfig(num_experts=e, top_k=k),
                                   expert=ExpertConfig(kind="ffn", hidden_dim=f, dropout=0.0)))
    half.experts = type(half.experts)(e // 2, c, f)
    assert parameter_counts(half, [half], ep_size=2)["experts"] == e * per_expert


def test_hierarchical_active_experts_are_coarse_times_fine_slots():
    cfg = HierarchicalMoEConfig(dim=8, coarse=RouterConfig(num_experts=3, top_k=1),
                                fine=RouterConfig(num_experts=2, top_k=2), num_groups=3, experts_per_group=2,
                                expert=ExpertConfig(kind="ffn", hidden_dim=8, dropout=0.0), patch_size=2)
    layer = HierarchicalMoE(cfg)
    counts = parameter_counts(layer, [layer], 1)
    per_expert = 8 * 8 + 8 + 8 * 8 + 8
    assert counts["experts"] == 6 * per_expert and counts["active_per_patch"] == counts["dense"] + 2 * per_expert


def test_hierarchical_head_active_experts_are_its_cells_times_top_k():
    from moe import HierarchicalFusion, HierarchicalFusionConfig

    d, s, m, ec, k = 8, 3, 3, 2, 1
    layer = HierarchicalFusion(HierarchicalFusionConfig(dim=d, scales=(1, 2, 4), num_modalities=m, experts_per_cell=ec,
                                                        top_k=k, expert=ExpertConfig(kind="ffn", hidden_dim=8, dropout=0.0)))
    counts = parameter_counts(layer, [layer], 1)
    per_expert = d * 8 + 8 + 8 * d + d
    fine = m * ((s * d) * (s * d // 2) + s * d // 2 + 2 * (s * d // 2) + (s * d // 2) * s + s)  # 2 layers + LN
    coarse = (2 * d) * d + d + 2 * d + d * 1 + 1
    cell_routers = m * s * (d * ec + ec)
    assert counts["dense"] == fine + coarse + m + cell_routers  # + the modality biases
    assert counts["experts"] == m * s * ec * per_expert
    assert counts["active_per_patch"] == counts["dense"] + m * s * k * per_expert  # per image: k in every cell


def test_matmul_flops_are_counted_as_run():
    x, w = torch.randn(10, 8), torch.randn(8, 4)
    assert count_flops(torch.mm, x, w)[0] == 2 * 10 * 8 * 4
    assert count_flops(torch.bmm, torch.randn(3, 5, 8), torch.randn(3, 8, 4))[0] == 2 * 3 * 5 * 8 * 4


@needs_cpu_grouped_mm
def test_grouped_mm_flops_are_added_to_torchs_counter():
    x, w = torch.randn(12, 8), torch.randn(3, 8, 4)
    offs = torch.tensor([5, 9, 12], dtype=torch.int32)
    flops, out = count_flops(compat.grouped_mm, x, w, offs)
    assert flops == 2 * 12 * 8 * 4 and out.shape == (12, 4)


def test_usage_variance_activation_rate_and_stability_by_hand():
    h = History(load=[[[30, 10, 0, 0]], [[10, 30, 0, 0]]],  # two intervals, one layer, 4 experts
                fusion_load=[[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])
    got = moe_usage(h, ["block1"])
    share = np.array([0.5, 0.5, 0.0, 0.0])
    block = got["layers"]["block1"]
    assert block["share"] == pytest.approx(share.tolist())
    assert block["usage_variance"] == pytest.approx(share.var())
    assert block["activation_rate"] == 0.5  # two of four got at least half of an even share (1/8)
    assert block["gate_stability"] == pytest.approx((0.25 + 0.25 + 0 + 0) / 4)  # std of 0.75/0.25 is 0.25
    assert got["fusion_gate"]["gate_stability"] == 0 and got["fusion_gate"]["activation_rate"] == 1


def test_inference_memory_is_weights_plus_the_largest_live_activations():
    from training.report.model_cost import inference_memory_mb

    m = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    x = torch.randn(512, 256)
    weights = sum(p.numel() * 4 for p in m.parameters())
    # the peak is during GELU: its input and output [512, 1024] both alive (then the input is freed)
    assert inference_memory_mb(m, x, torch.device("cpu")) == pytest.approx((weights + 2 * 512 * 1024 * 4) / 2**20)

"""Host syncs on the hot path, counted on CPU (gpucheck/host_syncs.py wraps what would sync on a GPU).

Budget (DESIGN.md): one per dispatching MoE layer - the all-to-all split sizes, or the row count
of a dynamic-k plan - and one per training step (the loss / finiteness / preemption all-reduce).
None where the row count is known on the host: dropless top-k on one rank (N*K), and the static
plans (E*C: capacity mode padded to [E, C], expert choice), on one rank or under EP.
The counter itself is checked first: it must see each kind of would-be sync. Whole training steps,
under torchrun: tests/integration/test_host_syncs.py.
"""

import pytest
import torch

from gpucheck.host_syncs import SyncCounter
from moe import ExpertConfig, PatchMoE, PatchMoEConfig, RouterConfig


def test_the_counter_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    with SyncCounter() as c:
        from training import trainer as project_module  # any project module: calls must come from project code
        code = compile("x.sum().item(); float(x[0]); bool(x[1] > 0); x[x > 2]; x.nonzero(); x.tolist();"
                       "torch.bincount(x.long()); torch.repeat_interleave(x, x.long())",
                       project_module.__file__, "exec")
        exec(code, {"x": x, "torch": torch})
        x.sum().item()  # from this test file: not project code, not counted
    kinds = sorted(site.split()[-1] for site in c.counts)
    assert kinds == sorted(["item", "__float__", "__bool__", "__getitem__", "nonzero", "tolist", "bincount",
                            "repeat_interleave"]), c.report()
    assert torch.Tensor.item is not None and "wrapper" not in repr(torch.Tensor.item)  # restored


def _layer_syncs(**router) -> int:
    cfg = PatchMoEConfig(dim=16, patch_size=2, router=RouterConfig(num_experts=4, **router),
                         expert=ExpertConfig(kind="seed", hidden_dim=32, impl="grouped_mm"))
    layer = PatchMoE(cfg)
    x = torch.randn(2, 8, 8, 16, requires_grad=True)
    layer(x)  # first call outside the counter
    with SyncCounter() as c:
        res = layer(x)
        (res.out.square().mean() + res.stats.aux_loss).backward()
    return c.total, c.report()


def test_patch_moe_dropless_top_k_never_reads_the_device():
    n, report = _layer_syncs(top_k=2)
    assert n == 0, report


def test_patch_moe_dynamic_k_reads_its_row_count_once():
    n, report = _layer_syncs(top_k=3, dynamic_top_p=0.5, k_min=1)
    assert n == 1, report


@pytest.mark.parametrize("router", [dict(top_k=2), dict(top_k=2, choice="expert"), dict(top_k=1, choice="expert")],
                         ids=["capacity", "expert-choice-k2", "expert-choice-k1"])
def test_patch_moe_static_plans_never_read_the_device(router):
    """Capacity mode (padded to [E, C]) and expert choice: the row count E * C is a host int."""
    cfg = PatchMoEConfig(dim=16, patch_size=2, capacity_factor=1.0, router=RouterConfig(num_experts=4, **router),
                         expert=ExpertConfig(kind="ffn", hidden_dim=32, impl="fused"))
    layer = PatchMoE(cfg)
    x = torch.randn(2, 8, 8, 16, requires_grad=True)
    with SyncCounter() as c:
        res = layer(x)
        (res.out.sum() + res.stats.aux_loss).backward()
    assert c.total == 0, c.report()  # the fused CPU experts take the static counts

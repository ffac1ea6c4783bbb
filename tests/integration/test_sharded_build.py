"""Sharded construction (issue 28, item 1): each rank builds only its own experts.

One model (configs/tiny.yaml with 64 FFN experts of dim 128, hidden 2048: 129 MiB of experts in its
one expert layer) built as the trainer builds it at EP = 1, 2, 4 (world = EP):
  * the experts of every rank, put side by side in global order, are bit-identical to the EP=1
    build, and the dense parameters are identical at every EP size;
  * the build's peak memory (the rise of the process's peak RSS across the build) stays within this
    rank's share of the experts plus the dense parameters plus a fixed slack, so it falls with EP:
    a build that made all E experts first (as before) exceeds the bound at EP 2 and 4.
"""

import os

import pytest
import torch

from tests.helpers import run_torchrun

OVERRIDES = ["model.dim=128", "model.patch_moe.router.num_experts=64", "model.patch_moe.expert.hidden_dim=2048"]
SLACK_MB = 40  # allocator rounding, per-expert init temporaries, DeepSpeed's group bookkeeping


def build(tmp_path, ep: int):
    out = str(tmp_path / f"ep{ep}")
    os.makedirs(out)
    reports, _ = run_torchrun("shard_build_check.py", ep, OVERRIDES, out, timeout=300)
    states = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(ep)]
    return reports, states


def gathered(states) -> dict:
    """Expert layer -> parameter -> [E, ...] in global expert order, from every rank's slice."""
    out = {}
    for layer in states[0]["experts"]:
        parts = sorted((s["experts"][layer] for s in states), key=lambda x: x["first"])
        out[layer] = {n: torch.cat([p["params"][n] for p in parts]) for n in parts[0]["params"]}
    return out


@pytest.mark.slow
def test_sharded_build_same_weights_and_memory_falls_with_ep(tmp_path):
    runs = {ep: build(tmp_path, ep) for ep in (1, 2, 4)}
    ref = gathered(runs[1][1])
    total_expert_mb = runs[1][0][0]["expert_mb"]
    assert total_expert_mb > 120  # the case is big enough for the memory to show
    for ep, (reports, states) in runs.items():
        got = gathered(states)
        for layer, params in ref.items():
            for name, full in params.items():
                assert torch.equal(got[layer][name], full), f"EP={ep}: layer {layer} {name} differs from EP=1"
        for s in states:
            for name, p in runs[1][1][0]["dense"].items():
                assert torch.equal(s["dense"][name], p), f"EP={ep}: dense {name} differs from EP=1"
        for r in reports:
            rise = r["rss_after_mb"] - r["rss_before_mb"]
            bound = total_expert_mb / ep + r["dense_mb"] + SLACK_MB
            print(f"EP={ep} rank {r['rank']}: build peak +{rise:.0f} MiB (bound {bound:.0f}; experts "
                  f"{r['expert_mb']:.0f} MiB of {total_expert_mb:.0f})")
            assert abs(r["expert_mb"] - total_expert_mb / ep) < 1e-6
            assert rise <= bound, f"EP={ep} rank {r['rank']}: the build's peak rose {rise:.0f} MiB > {bound:.0f} MiB"
    rise_1 = runs[1][0][0]["rss_after_mb"] - runs[1][0][0]["rss_before_mb"]
    assert rise_1 >= 0.8 * total_expert_mb, f"EP=1 build rose only {rise_1:.0f} MiB: RSS does not see the experts"

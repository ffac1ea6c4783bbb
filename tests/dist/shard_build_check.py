"""Worker (run under torchrun, EP size = world size): sharded construction of the ReID model.

Builds the model as the trainer does (inside ``experts_on_meta``, then ``shard_moe_layers``) and
writes, per rank: the process's peak RSS before and after the build (``ru_maxrss``), the bytes of
this rank's expert parameters, and the parameters themselves (<out>/rank<r>.pt: every expert
layer's local experts with their first global id, and the dense parameters) for the test to put
side by side across EP sizes.
"""

import argparse
import os
import resource

import torch

from harness import finish, init_world, write_result
from moe.experts import experts_on_meta
from parallel.ds_moe import shard_moe_layers
from parallel.groups import ParallelGroups
from reid.model import ReIDModel
from training.config import load_config


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    world = init_world()
    cfg = load_config(args.config, args.overrides)
    groups = ParallelGroups.build(world.world_size, cfg.model.num_experts)
    before = peak_rss_mb()
    torch.manual_seed(cfg.seed)
    with experts_on_meta():
        model = ReIDModel(cfg.model, num_classes=16)
    layers = shard_moe_layers(model, groups)
    after = peak_rss_mb()
    experts = {}
    for i, layer in enumerate(layers):
        inner = layer.deepspeed_moe
        experts[i] = {"first": inner.experts.first,
                      "params": {n: p.detach().clone() for n, p in inner.experts.named_parameters()}}
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." not in n}
    torch.save({"experts": experts, "dense": dense}, os.path.join(args.out, f"rank{world.rank}.pt"))
    expert_bytes = sum(p.numel() * p.element_size() for i in experts.values() for p in i["params"].values())
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.values())
    write_result(args.out, world.rank, {"rank": world.rank, "ep_size": groups.ep_size, "rss_before_mb": before,
                                        "rss_after_mb": after, "expert_mb": expert_bytes / 2**20,
                                        "dense_mb": dense_bytes / 2**20})
    finish()


if __name__ == "__main__":
    main()

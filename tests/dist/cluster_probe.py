"""Worker (one torchrun agent per emulated node, cluster/agents.py): what a rank sees of the cluster.

Joins the process group, all-reduces rank + 1 over the world and writes <out>/attempt<n>/rank<r>.json
(n: TORCHELASTIC_RESTART_COUNT) with its rank, world size, node (GROUP_RANK), LOCAL_WORLD_SIZE,
MASTER_ADDR and the sum. ``--hold`` (first attempt only): after the report, keeps all-reducing until a
peer is gone (a killed node), so that the agents restart it under an elastic rendezvous.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

from harness import finish, init_world, write_result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--hold", action="store_true")
    args = ap.parse_args()
    world = init_world(timeout_s=60)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    total = torch.tensor([float(world.rank + 1)])
    dist.all_reduce(total)
    write_result(os.path.join(args.out, f"attempt{attempt}"), world.rank, {
        "rank": world.rank, "world": world.world_size, "node": int(os.environ["GROUP_RANK"]),
        "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]), "master_addr": os.environ["MASTER_ADDR"],
        "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "sum": float(total)})
    while args.hold and attempt == 0:
        dist.all_reduce(torch.ones(1))  # raises once a peer's node is killed
        time.sleep(0.1)
    finish()


if __name__ == "__main__":
    main()

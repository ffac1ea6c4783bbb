"""Worker (run under torchrun, 2 ranks, gloo): the named wait of a ``host_reads`` collective.

The process group's own timeout is long (120 s); the named wait is short (--wait-s). Rank 1 never
calls the collective. Rank 0 must fail in its own thread after about --wait-s with the
collective's name (what NCCL ranks get from parallel/nccl.py's policy), and writes
<out>/rank0.json with the message and the seconds waited; rank 1 writes rank1.json and leaves.
"""

import argparse
import os
import time

import torch

from harness import init_world, write_result
from parallel.all_to_all import CollectiveError, exchange, set_host_wait_timeout

ap = argparse.ArgumentParser()
ap.add_argument("--wait-s", type=float, default=3.0)
ap.add_argument("--out", required=True)
args = ap.parse_args()
rank = init_world("gloo", timeout_s=120).rank
report = {"rank": rank}
if rank == 0:
    set_host_wait_timeout(args.wait_s)
    t0 = time.monotonic()
    try:
        exchange(torch.ones(2, dtype=torch.long), [1, 1], [1, 1], None, "all-to-all of test counts", host_reads=True)
        report["error"] = None
    except CollectiveError as exc:
        report["error"] = str(exc)
    report["waited_s"] = time.monotonic() - t0
    # both ways agree when every rank calls it
else:
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(args.out, "rank0.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
write_result(args.out, rank, report)
os._exit(0)  # no teardown of a group with an unmatched collective

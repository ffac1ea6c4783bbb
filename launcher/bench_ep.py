"""The EP benchmark's worker, one per rank under any launcher (``msmoe bench ep`` starts it with torchrun):

  torchrun --nproc_per_node 2 -m launcher.bench_ep --ep-size 2 --result ep.json
  mpirun -np 2 python -m launcher.bench_ep --ep-size 2 --result ep.json
"""

from __future__ import annotations

import argparse

from launcher import allocator

allocator.tune()  # before torch is imported, as every msmoe command does

from bench.ep import run_worker  # noqa: E402
from launcher.bench import add_ep_shape, ep_shape  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m launcher.bench_ep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ep-size", type=int, required=True)
    ap.add_argument("--result", required=True, help="rank 0 writes the results here (JSON)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the deepspeed launcher adds it
    add_ep_shape(ap)
    args = ap.parse_args()
    run_worker(ep_shape(args), args.ep_size, args.result)
    from parallel.dist import leave_distributed

    leave_distributed(0)


if __name__ == "__main__":
    main()

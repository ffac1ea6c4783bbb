"""``msmoe convert``: change a checkpoint's expert-parallel size (optimizer state carried).

  msmoe convert --src runs/default/checkpoints --tag step0000600 --out runs/ep4/checkpoints --ep-size 4

The converted checkpoint loads with DeepSpeed's ``load_checkpoint`` (or ``msmoe train --resume``)
on a world whose EP size is the new one. Supported: ZeRO stage 0 checkpoints.
"""

from __future__ import annotations

import argparse
import os


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="move a checkpoint to another EP size, optimizer state included",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--src", required=True, help="checkpoint directory (holds <tag>/ and 'latest')")
    c.add_argument("--tag", default=None, help="tag to convert (default: the one in 'latest')")
    c.add_argument("--out", required=True, help="output checkpoint directory")
    c.add_argument("--ep-size", type=int, required=True, help="expert-parallel size of the new checkpoint")
    c.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from parallel.reshard import ReshardError, reshard_checkpoint

    tag = args.tag
    if tag is None:
        latest = os.path.join(args.src, "latest")
        if not os.path.isfile(latest):
            raise ReshardError(f"no --tag given and no 'latest' file in {args.src}")
        tag = open(latest).read().strip()
    info = reshard_checkpoint(args.src, tag, args.out, args.ep_size)
    print(f"converted {tag}: EP {info['from_ep_size']} -> {info['to_ep_size']}, written to {info['out']}")
    return 0

"""``msmoe convert``: change a checkpoint's expert-parallel size (optimizer state carried).

  msmoe convert --src runs/default/checkpoints --out runs/ep4/checkpoints --ep-size 4
  msmoe convert --src runs/default/checkpoints --out runs/up/checkpoints --num-experts 24 --mode upcycle --noise 0.01
  msmoe convert --src runs/default/checkpoints --out runs/pr/checkpoints --num-experts 2 --mode prune \
                --usage runs/default/summary.json

--ep-size: the converted checkpoint loads with ``msmoe train --resume`` (DeepSpeed's
``load_checkpoint``) on a world of the new EP size, optimizer state included (ZeRO stage 0).
--num-experts: weights only (Adam moments cannot follow a change of shape); start from it with
``msmoe train --init-from <dir> model.patch_moe.router.num_experts=<N>``. Upcycling copies every
expert (copy 0 exact, the others with --noise) and keeps the layer's function; prune/merge keep the
most used experts, with the usage taken from a run's summary.json (expert_load, whole run).
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
    c.add_argument("--ep-size", type=int, default=None, help="expert-parallel size of the new checkpoint")
    c.add_argument("--num-experts", type=int, default=None, help="new number of experts per MoE layer")
    c.add_argument("--mode", choices=["upcycle", "prune", "merge"], default="upcycle")
    c.add_argument("--noise", type=float, default=0.0, help="upcycling: noise on the copies, x weight std")
    c.add_argument("--score-fn", choices=["softmax", "sigmoid"], default="softmax", help="the router's score_fn")
    c.add_argument("--usage", default=None, help="prune/merge: a run's summary.json with per-layer expert load")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from parallel.reshard import ReshardError, reshard_checkpoint, resize_experts_checkpoint

    from training import checkpoint

    src, out = os.path.realpath(args.src), os.path.realpath(args.out)
    if out == src or out.startswith(src + os.sep):
        raise ReshardError(f"--out {args.out} is {'--src itself' if out == src else 'inside --src'} ({args.src}): "
                           "converting in place would mix checkpoints of two layouts in one directory; give a new "
                           "directory, e.g. --out runs/<name>-converted/checkpoints")
    tag = args.tag or checkpoint.newest_complete(args.src)
    if tag is None:
        latest = os.path.join(args.src, "latest")
        if not os.path.isfile(latest):
            raise ReshardError(f"no --tag given and no complete checkpoint (nor a 'latest' file) in {args.src}")
        tag = open(latest).read().strip()
    if (args.ep_size is None) == (args.num_experts is None):
        raise ReshardError("give exactly one of --ep-size (reshard) or --num-experts (upcycle/prune/merge)")
    if args.ep_size is not None:
        info = reshard_checkpoint(args.src, tag, args.out, args.ep_size)
        checkpoint.mark_complete(args.out, tag)
        print(f"converted {tag}: EP {info['from_ep_size']} -> {info['to_ep_size']}, written to {info['out']}")
        return 0
    info = resize_experts_checkpoint(args.src, tag, args.out, args.num_experts, _transform(args))
    checkpoint.mark_complete(args.out, tag)
    print(f"converted {tag}: experts {info['from_experts']} -> {info['to_experts']} per layer ({args.mode}), "
          f"weights only, written to {info['out']}")
    return 0


def _transform(args):
    import json

    import torch

    from moe.resize import shrink_state, upcycle_state

    usage = None
    if args.mode in ("prune", "merge"):
        if not args.usage:
            raise SystemExit(f"--mode {args.mode} needs --usage <summary.json> (which experts were used)")
        with open(args.usage) as fh:
            usage = [v["whole_run"] for v in json.load(fh)["expert_load"].values()]
    gen = torch.Generator().manual_seed(args.seed)

    def transform(state, num_experts, layer):
        if args.mode == "upcycle":
            return upcycle_state(state, num_experts, args.num_experts, score_fn=args.score_fn,
                                 noise=args.noise, generator=gen)
        return shrink_state(state, num_experts, args.num_experts, usage[layer], mode=args.mode)[0]
    return transform

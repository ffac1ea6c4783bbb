"""``msmoe convert``: change a checkpoint's expert-parallel size (optimizer state carried), or its
experts per MoE layer (weights only).

  msmoe convert --src runs/default/checkpoints --out runs/ep4/checkpoints --ep-size 4
  msmoe convert --src runs/default/checkpoints --out runs/up/checkpoints --num-experts 24 --mode upcycle --noise 0.01
  msmoe convert --src runs/default/checkpoints --out runs/pr/checkpoints --num-experts 2 --mode prune \\
                --usage runs/default/summary.json
  msmoe convert --src runs/hierarchical/checkpoints --out runs/rgb8/checkpoints --config runs/hierarchical/config.yaml \\
                --group 0 --num-experts 8 --mode upcycle

--ep-size: the converted checkpoint loads with ``msmoe train --resume`` (DeepSpeed's
``load_checkpoint``) on a world of the new EP size, optimizer state included. It is a ZeRO stage 0
checkpoint, also when --src was saved at ZeRO 1/2 (whose partitioned optimizer state is put together
first); a ZeRO 1/2 run resumes from it too (the state is partitioned again on load).
--num-experts: weights only (Adam moments cannot follow a change of shape); start from it with
``msmoe train --init-from <dir> model.patch_moe.router.num_experts=<N>``. Upcycling copies every
expert (copy 0 exact, the others with --noise) and keeps the layer's function; prune/merge keep the
most used experts, with the usage taken from a run's summary.json (expert_load, whole run).
Only the MoE layers of the backbone blocks ("blocks.*") are resized; any other MoE layer (a head's)
is copied as it is.
--group G --num-experts N (hierarchical MoE blocks): group G alone grows or shrinks to N fine
experts (upcycle: a whole multiple of its size; prune/merge: fewer), its fine router with it; the
coarse router and the other groups stay as they were, every expert moved to its id under the new
sizes. The checkpoint does not hold the layer layout (group sizes, placement), so --config names
the run's config: the config.yaml that ``msmoe train`` writes into the run directory
(runs/<name>/config.yaml), which holds every override the run was started with. The command prints
the overrides that ``msmoe train --init-from <out>`` then needs
('model.hierarchical.experts_per_group=[8,4,4]' model.hierarchical.fine.num_experts=8).
"""

from __future__ import annotations

import argparse
import os


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="move a checkpoint to another EP size or expert count",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--src", required=True, help="checkpoint directory (holds <tag>/ and 'latest')")
    c.add_argument("--tag", default=None, help="tag to convert (default: the newest complete step that verifies)")
    c.add_argument("--out", required=True, help="output checkpoint directory")
    c.add_argument("--ep-size", type=int, default=None, help="expert-parallel size of the new checkpoint")
    c.add_argument("--num-experts", type=int, default=None,
                   help="new number of experts per MoE layer (with --group: of that group)")
    c.add_argument("--group", type=int, default=None,
                   help="hierarchical MoE: resize this coarse group only (needs --config)")
    c.add_argument("--config", default=None,
                   help="the run's config.yaml (runs/<name>/config.yaml): the layer layout for --group")
    c.add_argument("--mode", choices=["upcycle", "prune", "merge"], default="upcycle")
    c.add_argument("--noise", type=float, default=0.0, help="upcycling: noise on the copies, x weight std")
    c.add_argument("--score-fn", choices=["softmax", "sigmoid"], default=None,
                   help="the router's score_fn (default: from --config, else softmax)")
    c.add_argument("--usage", default=None, help="prune/merge: a run's summary.json with per-layer expert load")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from parallel.reshard import ReshardError
    from training.checkpoint.verify import reading

    src, out = os.path.realpath(args.src), os.path.realpath(args.out)
    if out == src or out.startswith(src + os.sep):
        raise ReshardError(f"--out {args.out} is {'--src itself' if out == src else 'inside --src'} ({args.src}): "
                           "converting in place would mix checkpoints of two layouts in one directory; give a new "
                           "directory, e.g. --out runs/<name>-converted/checkpoints")
    if (args.ep_size is None) == (args.num_experts is None):
        raise ReshardError("give exactly one of --ep-size (reshard) or --num-experts (upcycle/prune/merge)")
    with reading(args.src, args.tag, "convert") as tag:  # verified, and not pruned while it is read
        return _convert(args, tag)


def _convert(args: argparse.Namespace, tag: str) -> int:
    from parallel.reshard import ReshardError, reshard_checkpoint, resize_experts_checkpoint

    from training.checkpoint import store

    if args.ep_size is not None:
        if args.group is not None:
            raise ReshardError("--group resizes one group (with --num-experts); it does not go with --ep-size")
        info = reshard_checkpoint(args.src, tag, args.out, args.ep_size)
        store.mark_complete(args.out, tag)
        stage = f", ZeRO stage {info['from_zero_stage']} -> 0" if info["from_zero_stage"] else ""
        print(f"converted {tag}: EP {info['from_ep_size']} -> {info['to_ep_size']}{stage}, written to {info['out']}")
        return 0
    transform, note = _transform(args)
    info = resize_experts_checkpoint(args.src, tag, args.out, transform)
    store.mark_complete(args.out, tag)
    what = f"group {args.group}: layer experts" if args.group is not None else "experts"
    to = info["to_experts"] if args.group is not None else args.num_experts
    print(f"converted {tag}: {what} {info['from_experts']} -> {to} per layer ({args.mode}), "
          f"weights only, written to {info['out']}")
    if note:
        print(note)
    return 0


def _usage(args) -> dict | None:
    """Per-block expert load of the whole run (summary.json), keyed "block<i>"."""
    import json

    if args.mode == "upcycle":
        return None
    if not args.usage:
        raise SystemExit(f"--mode {args.mode} needs --usage <summary.json> (which experts were used)")
    with open(args.usage) as fh:
        return {k: v["whole_run"] for k, v in json.load(fh)["expert_load"].items()}


def _block_of(module_prefix: str) -> str:
    """"blocks.3.ffn." -> "block3" (the summary's expert_load key)."""
    return "block" + module_prefix.split(".")[1]


def _transform(args):
    """-> (transform for resize_experts_checkpoint, a note for the user or None)."""
    import torch

    from training.config import load_config

    usage = _usage(args)
    gen = torch.Generator().manual_seed(args.seed)
    model = load_config(args.config).model if args.config else None
    hier = _is_hierarchical(args, model)
    layer_usage = _layer_usage_of(args, usage)
    if not hier:
        return _experts_transform(args, model, layer_usage, gen), None
    return _group_transform(args, model.hierarchical_config(), layer_usage, gen)


def _is_hierarchical(args, model) -> bool:
    """Whether --config's model has hierarchical MoE blocks; refuses --group without them, and them without --group."""
    from parallel.reshard import ReshardError

    hier = model is not None and model.moe_kind == "hierarchical"
    if args.group is not None and not hier:
        raise ReshardError("--group resizes one group of hierarchical MoE blocks: give --config <the run's "
                           "config.yaml> of a run with model.moe_kind=hierarchical" +
                           (f" ({args.config} has moe_kind={model.moe_kind!r})" if model is not None else ""))
    if hier and args.group is None:
        raise ReshardError(f"{args.config} has hierarchical MoE blocks: give --group <g> to resize one group")
    return hier


def _layer_usage_of(args, usage):
    """-> layer_usage(module_prefix, num_experts): that layer's expert load from ``usage`` (None: upcycling)."""
    from parallel.reshard import ReshardError

    def layer_usage(module_prefix, num_experts):
        if usage is None:
            return None
        u = usage.get(_block_of(module_prefix))
        if u is None or len(u) != num_experts:
            raise ReshardError(f"{args.usage} has no expert load of {num_experts} experts for {module_prefix} "
                               f"({_block_of(module_prefix)}): give the summary.json of the run that made --src")
        return u
    return layer_usage


def _experts_transform(args, model, layer_usage, gen):
    """The transform of a plain MoE layer: every layer's experts to --num-experts."""
    from moe.resize import shrink_state, upcycle_state
    from parallel.reshard import ReshardError

    score_fn = args.score_fn or (model.patch_moe_config().router.score_fn if model is not None else "softmax")

    def transform(state, num_experts, module_prefix):
        if any(k.startswith("fine.") for k in state):
            raise ReshardError(f"{module_prefix} is a hierarchical MoE layer: give --config <the run's config.yaml> "
                               "and --group <g>")
        if args.mode == "upcycle":
            return upcycle_state(state, num_experts, args.num_experts, score_fn=score_fn,
                                 noise=args.noise, generator=gen)
        return shrink_state(state, num_experts, args.num_experts, layer_usage(module_prefix, num_experts),
                            mode=args.mode)[0]
    return transform


def _group_transform(args, cfg, layer_usage, gen):
    """-> (the transform of a hierarchical MoE layer: group --group to --num-experts, the overrides note)."""
    from moe.resize import resize_group_state
    from parallel.reshard import ReshardError

    sizes = cfg.group_sizes
    note = _group_note(args, cfg)

    def transform(state, num_experts, module_prefix):
        if num_experts != sum(sizes):
            raise ReshardError(f"{module_prefix} has {num_experts} experts, but {args.config} says "
                               f"experts_per_group={list(sizes)} ({sum(sizes)}): give the config of the run that made --src")
        return resize_group_state(state, sizes, cfg.placement, args.group, args.num_experts, mode=args.mode,
                                  usage=layer_usage(module_prefix, num_experts),
                                  score_fn=args.score_fn or cfg.fine.score_fn, noise=args.noise, generator=gen)[0]
    return transform, note


def _group_note(args, cfg) -> str:
    """Checks the new group sizes (a valid layer config) -> the overrides ``msmoe train --init-from`` needs."""
    import dataclasses

    from parallel.reshard import ReshardError

    sizes = cfg.group_sizes
    if not 0 <= args.group < len(sizes):
        raise ReshardError(f"--group {args.group}: the run has groups 0..{len(sizes) - 1}")
    new_sizes = sizes[:args.group] + (args.num_experts,) + sizes[args.group + 1:]
    epg = list(new_sizes) if len(set(new_sizes)) > 1 else new_sizes[0]
    dataclasses.replace(cfg, experts_per_group=epg if isinstance(epg, int) else tuple(epg),
                        fine=dataclasses.replace(cfg.fine, num_experts=max(new_sizes)))  # validates: top_k fits
    epg_arg = (f"'model.hierarchical.experts_per_group=[{','.join(map(str, epg))}]'" if isinstance(epg, list)
               else f"model.hierarchical.experts_per_group={epg}")  # quoted: [..] is a shell pattern
    return (f"train from it with: --init-from {args.out} {epg_arg} "
            f"model.hierarchical.fine.num_experts={max(new_sizes)}")

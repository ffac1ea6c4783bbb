"""``msmoe export``: a run's newest complete checkpoint as one file a single process loads without
DeepSpeed; ``msmoe embed``: retrieval features from such a file.

  msmoe export --run-dir runs/default                          # -> runs/default/model.safetensors
  msmoe embed --model runs/default/model.safetensors --data data_cache/synth --split query --out q.safetensors
  msmoe embed --model runs/default/model.safetensors --images path/to/folder --out feats.npy

Export reads any EP size and ZeRO stage 0/1/2 (every expert consolidated, stacked by global id) and
stores the model config with the weights; load it in Python with ``reid.exported.load_exported``.
Embed takes a dataset split (``msmoe data`` storage) or a folder with RGB/ NI/ TI/ (or rgb/ nir/ tir/)
subfolders holding the same image names, and writes features (after BNNeck) with the image names:
a .safetensors file (names in its metadata) or a .npy file (+ <out>.names.txt).
"""

from __future__ import annotations

import argparse
import os


def add_parsers(sub) -> None:
    e = sub.add_parser("export", help="a run's checkpoint as one safetensors file (no DeepSpeed needed to load)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--run-dir", required=True, help="the run (holds config.yaml and checkpoints/)")
    e.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    e.add_argument("--out", default=None, help="output file (default: <run-dir>/model.safetensors)")
    e.set_defaults(func=run_export)

    m = sub.add_parser("embed", help="retrieval features of a dataset split or an image folder from an export",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--model", required=True, help="a file written by msmoe export")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a dataset directory (msmoe data)")
    src.add_argument("--images", help="a folder with RGB/ NI/ TI/ (or rgb/ nir/ tir/) subfolders")
    m.add_argument("--split", default="query", help="with --data: train, query or gallery")
    m.add_argument("--out", required=True, help="features file: .safetensors or .npy")
    m.add_argument("--batch-size", type=int, default=64)
    m.add_argument("--device", default="cpu")
    m.set_defaults(func=run_embed)


def run_export(args: argparse.Namespace) -> int:
    import yaml

    from parallel.consolidate import consolidated_state
    from reid.data import image_size, load_splits, read_meta
    from reid.exported import save_exported
    from training.checkpoint import store
    from training.checkpoint.verify import reading

    ckpt_dir = os.path.join(args.run_dir, store.CKPT_DIR)
    with open(os.path.join(args.run_dir, "config.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    with reading(ckpt_dir, args.tag, "export") as tag:  # verified, and not pruned while it is read
        state = consolidated_state(os.path.join(ckpt_dir, tag))
    if read_meta(cfg["data"]["path"]) is not None:  # the training images' size, from the data itself
        size = image_size(load_splits(cfg["data"]["path"]))
    else:
        synth = cfg["data"].get("synth") or {}
        size = (synth.get("height", 128), synth.get("width", 64))
    out = args.out or os.path.join(args.run_dir, "model.safetensors")
    save_exported(out, state, cfg["model"], int(state["classifier.weight"].shape[0]), size,
                  run=cfg["name"], tag=tag)
    n = sum(v.numel() for v in state.values())
    print(f"exported {args.run_dir} {tag}: {n:,} values, model config included -> {out}")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    from reid.embed import embed_folder, embed_split, write_features
    from reid.exported import load_exported

    model = load_exported(args.model, args.device)
    if args.images:
        names, feats = embed_folder(model.net, args.images, model.image_size, args.batch_size, args.device)
    else:
        from reid.data import load_splits

        splits = load_splits(args.data)
        if args.split not in splits:
            raise FileNotFoundError(f"--split {args.split}: {args.data} has splits {sorted(splits)}")
        names, feats = embed_split(model.net, splits[args.split], args.batch_size, args.device)
    files = write_features(args.out, names, feats)
    print(f"embedded {len(names)} image set(s) -> {', '.join(files)} (features [{len(names)}, {feats.shape[1]}])")
    return 0

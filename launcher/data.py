"""``msmoe data``: make or import a dataset.

  msmoe data synth --out data_cache/synth                     # the embedded default (seeded)
  msmoe data synth --config configs/tiny.yaml                 # the set a config asks for
  msmoe data rgbnt201 --src /data/RGBNT201 --out data_cache/rgbnt201 [--skip-bad]
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    d = sub.add_parser("data", help="make the synthetic set or import RGBNT201")
    dsub = d.add_subparsers(dest="data_command", metavar="DATA")
    dsub.required = True
    s = dsub.add_parser("synth", help="generate the multi-spectral synthetic ReID set (cached)")
    s.add_argument("--config", default=None, help="take data.path and data.synth from this run config")
    s.add_argument("--out", default=None, help="output directory (default: the config's data.path)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--force", action="store_true", help="regenerate even if present (only a set msmoe made is replaced)")
    s.set_defaults(func=run_synth)
    r = dsub.add_parser("rgbnt201", help="import an RGBNT201 folder (train_171/, test/ with RGB/NI/TI)")
    r.add_argument("--src", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--height", type=int, default=128)
    r.add_argument("--width", type=int, default=64)
    r.add_argument("--skip-bad", action="store_true", help="skip bad records (counted) instead of failing")
    r.set_defaults(func=run_rgbnt201)


def run_synth(args: argparse.Namespace) -> int:
    import dataclasses

    from training.config import load_config
    from reid.data import dataset_summary, load_splits
    from reid.synth import ensure_synth

    cfg = load_config(args.config or "configs/default.yaml")
    spec = cfg.data.synth_spec()
    if args.seed is not None:
        spec = dataclasses.replace(spec, seed=args.seed)
    out = args.out or cfg.data.path
    made = ensure_synth(out, spec, force=args.force, field="--out" if args.out else "data.path")
    print(("generated" if made else "already present:"), out, dataset_summary(load_splits(out)))
    return 0


def run_rgbnt201(args: argparse.Namespace) -> int:
    from reid.rgbnt201 import import_rgbnt201

    rep = import_rgbnt201(args.src, args.out, args.height, args.width, "skip" if args.skip_bad else "error")
    print(f"imported {rep.records} into {args.out}; skipped {len(rep.bad)} bad record(s)")
    for b in rep.bad[:20]:
        print(f"  skipped {b['file']}: {b['reason']}")
    return 0

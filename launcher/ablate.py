"""``msmoe ablate``: parse, then train the configs and write the table (bench/ablate.py).

  msmoe ablate                                           # the default list, 2 processes each
  msmoe ablate --configs configs/default.yaml configs/hierarchical.yaml train.steps=100 --out runs/quick
"""

from __future__ import annotations

import argparse

from bench import ablate


def add_parser(sub) -> None:
    p = sub.add_parser("ablate", help="train a list of configs and write one ablation table (md, csv, png)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(ablate.DEFAULT_CONFIGS), help="run configs, in table order")
    p.add_argument("--nproc", type=int, default=2, help="processes per run")
    p.add_argument("--run-root", default=None, help="where the runs go (default: --out)")
    p.add_argument("--out", default="runs/ablation", help="directory for ablation.md/.csv/.png")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run, e.g. train.steps=100")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # key=value items after --configs belong to the overrides
    configs = tuple(c for c in args.configs if "=" not in c)
    overrides = tuple(c for c in args.configs if "=" in c) + tuple(args.overrides)
    spec = ablate.AblateSpec(configs=configs, overrides=overrides, nproc=args.nproc,
                             run_root=args.run_root or args.out, out=args.out)
    try:
        names = ablate.run_all(spec)
    except ablate.AblationError as exc:
        print(f"msmoe: error: {exc}")
        return 1
    path = ablate.write_table([ablate.row(spec.run_root, n) for n in names], spec.out, spec.run_root)
    print(f"ablation table: {path}")
    return 0

"""``msmoe ablate``: parse, then train the configs and write the table (scaling/ablation.py).

  msmoe ablate                                           # the default list, 2 processes each
  msmoe ablate --set routing --out runs/ablation-routing  # expert vs token choice, E = 4 / 16 / 64, top-2
  msmoe ablate --configs configs/default.yaml configs/hierarchical.yaml train.steps=100 --out runs/quick
  msmoe ablate --submit --nodes 1 --gpus-per-node 8 --time 02:00:00 --partition gpu   # one SLURM job per run

With --submit every unfinished run is queued at once through `msmoe submit` (same options), then
waited for; the table is written when all have finished. --no-wait returns after queueing: run the
same command again later (it keeps finished runs and waits for queued ones) to get the table.
"""

from __future__ import annotations

import argparse

from launcher.command import msmoe_command
from scaling import ablation as ablate


def add_parser(sub) -> None:
    p = sub.add_parser("ablate", help="train a list of configs and write one ablation table (md, csv, png)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, help="run configs, in table order (default: --set's)")
    p.add_argument("--set", choices=sorted(ablate.SETS), default="default",
                   help="a named list of configs: default (the thesis's ablations), routing (expert vs token choice "
                        "at E = 4, 16, 64 with top-2: equal active FLOPs)")
    p.add_argument("--nproc", type=int, default=2, help="processes per run")
    p.add_argument("--run-root", default=None, help="where the runs go (default: --out)")
    p.add_argument("--out", default="runs/ablation", help="directory for ablation.md/.csv/.png")
    s = p.add_argument_group("SLURM (--submit): the runs as jobs through `msmoe submit`")
    s.add_argument("--submit", action="store_true", help="one SLURM job per unfinished run, then wait for them")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=None, help="processes per node (default: --nproc)")
    s.add_argument("--time", default=None, help="time limit of each job, e.g. 02:00:00 (required with --submit)")
    s.add_argument("--partition", default=None)
    s.add_argument("--account", default=None)
    s.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    s.add_argument("--port", type=int, default=None, help="rendezvous port (msmoe submit's default if not given)")
    s.add_argument("--no-wait", action="store_true", help="queue the jobs and return (no table yet)")
    s.add_argument("--poll", type=float, default=30.0, help="seconds between queue checks while waiting")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run, e.g. train.steps=100")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # key=value items after --configs belong to the overrides
    given = args.configs if args.configs is not None else list(ablate.SETS[args.set])
    configs = tuple(c for c in given if "=" not in c)
    overrides = tuple(c for c in given if "=" in c) + tuple(args.overrides)
    spec = ablate.AblateSpec(configs=configs, overrides=overrides, nproc=args.nproc,
                             run_root=args.run_root or args.out, out=args.out)
    try:
        if args.submit:
            names = ablate.submit_all(spec, msmoe_command, _submit_args(args), wait=not args.no_wait, poll_s=args.poll)
            if args.no_wait:
                print("jobs queued; run the same command again once they finish to write the table")
                return 0
        else:
            names = ablate.run_all(spec, msmoe_command)
    except ablate.AblationError as exc:
        print(f"msmoe: error: {exc}")
        return 1
    path = ablate.write_table([ablate.row(spec.run_root, n) for n in names], spec.out, spec.run_root)
    print(f"ablation table: {path}")
    return 0


def _submit_args(args: argparse.Namespace) -> tuple[str, ...]:
    if not args.time:
        raise SystemExit("msmoe ablate --submit needs --time (each job's time limit, e.g. --time 02:00:00)")
    out = ["--nodes", str(args.nodes), "--gpus-per-node", str(args.gpus_per_node or args.nproc), "--time", args.time,
           "--device", args.device]
    for flag, value in (("--partition", args.partition), ("--account", args.account), ("--port", args.port)):
        if value is not None:
            out += [flag, str(value)]
    return tuple(out)

"""``msmoe scale`` and ``msmoe report``: parse, then call the sweep (bench/scale_sweep.py) and the
report (bench/scale_report.py, bench/scale_model.py)."""

from __future__ import annotations

import argparse
import os

from bench import scale_report, scale_sweep


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} must be a comma list of integers, e.g. 1,2,4") from None


def add_parsers(sub) -> None:
    p = sub.add_parser("scale", help="throughput sweep (world x EP x experts) -> JSON lines",
                       description=scale_sweep.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/scale.yaml")
    p.add_argument("--world", type=_ints, default=[1, 2], help="world sizes, e.g. 1,2,4")
    p.add_argument("--ep", type=_ints, default=[1, 2], help="EP sizes")
    p.add_argument("--experts", type=_ints, default=[4, 8], help="expert counts (model.patch_moe.router.num_experts)")
    p.add_argument("--modes", default="strong,weak", help="strong, weak or both")
    p.add_argument("--steps", type=int, default=24, help="training steps per point (the first 3 are not timed)")
    p.add_argument("--run-root", default="runs/scale", help="where the point runs go")
    p.add_argument("--out", default=None, help="JSON lines file (default: <run-root>/points.jsonl)")
    p.add_argument("--collect", default=None, metavar="RUN_ROOT", help="only turn existing summaries into JSON lines")
    p.add_argument("--slurm", action="store_true", help="submit the points as SLURM job arrays instead")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default="00:30:00")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: print the job scripts")
    p.add_argument("overrides", nargs="*", help="config overrides for every point")
    p.set_defaults(func=run_scale)

    r = sub.add_parser("report", help="scaling report (report.md + plots) from msmoe scale's JSON lines",
                       description=scale_report.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--points", default="runs/scale/points.jsonl")
    r.add_argument("--out", default=None, help="directory for report.md and the plots (default: beside --points)")
    r.add_argument("--alpha-us", type=float, default=None, help="projection: latency per peer (us), not fitted")
    r.add_argument("--beta-gbps", type=float, default=None, help="projection: link bandwidth (Gb/s), not fitted")
    r.add_argument("--layer-sweep", default=None, metavar="JSON",
                   help="a `msmoe bench layer --experts-sweep ... --json` file: adds the layer cost vs expert count")
    r.set_defaults(func=run_report)


def run_scale(args) -> int:
    if args.collect:
        out = args.out or os.path.join(args.collect, "points.jsonl")
        recs = scale_sweep.collect(args.collect, out)
        print(f"{len(recs)} points -> {out}")
        return 0
    spec = scale_sweep.SweepSpec(
        config=args.config, steps=args.steps, run_root=args.run_root,
        out=args.out or os.path.join(args.run_root, "points.jsonl"), gpus_per_node=args.gpus_per_node,
        partition=args.partition, time=args.time, device=args.device, dry_run=args.dry_run)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ("strong", "weak")]
    if bad:
        raise scale_sweep.ScaleError(f"--modes {args.modes!r}: {bad} not in strong, weak")
    points, skipped = scale_sweep.plan(args.world, args.ep, args.experts, modes)
    for why in skipped:
        print(f"skipped: {why}")
    if not points:
        raise scale_sweep.ScaleError("no point left to run: check --world, --ep and --experts")
    extra = list(args.overrides)
    if args.slurm:
        scale_sweep.run_slurm(points, spec, extra)
        return 0
    scale_sweep.run_local(points, spec, extra)
    recs = scale_sweep.collect(spec.run_root, spec.out)
    print(f"{len(recs)} points -> {spec.out}   (next: msmoe report --points {spec.out})")
    return 0


def run_report(args) -> int:
    from bench.scale_model import load_points

    if not os.path.isfile(args.points):
        raise FileNotFoundError(f"--points {args.points}: no such file; make it with `msmoe scale`")
    path = scale_report.write_scale_report(load_points(args.points),
                                           args.out or os.path.dirname(os.path.abspath(args.points)),
                                           args.alpha_us, args.beta_gbps, _read_json(args.layer_sweep))
    print(f"report: {path}")
    return 0


def _read_json(path: str | None):
    if path is None:
        return None
    import json

    with open(path) as fh:
        return json.load(fh)

"""``msmoe scale`` and ``msmoe report``: parse, then call the sweep (scaling/sweep.py) and the
report (scaling/report.py, scaling/points.py)."""

from __future__ import annotations

import argparse
import os

from launcher.command import msmoe_command
from scaling import report as scale_report
from scaling import sweep as scale_sweep
from scaling.comm_model import MEASURED, PRESETS, parse_node, parse_presets
from scaling.projection import DEFAULT_PRESETS, ProjectionSpec
from scaling.cluster_report import cluster_summary, is_cluster
from scaling.projection_report import validation_summary


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} must be a comma list of integers, e.g. 1,2,4") from None


def add_parsers(sub) -> None:
    p = sub.add_parser("scale", help="throughput sweep (world x EP x experts) -> JSON lines",
                       description=scale_sweep.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/scale.yaml")
    p.add_argument("--world", type=_ints, default=None, help="world sizes, e.g. 1,2,4 (default 1,2)")
    p.add_argument("--ep", type=_ints, default=None, help="EP sizes (default 1,2)")
    p.add_argument("--experts", type=_ints, default=None,
                   help="expert counts (model.patch_moe.router.num_experts; default 4,8)")
    p.add_argument("--modes", default=None, help="strong, weak or both (default strong,weak)")
    p.add_argument("--validation", action="store_true",
                   help="the sweep that checks the report's model: world 1,2,4 x EP 1,2,4, 4 experts, strong and "
                        "weak, 40 steps with the stages timed every 2nd, into runs/validation; `msmoe report "
                        "--fit-max-world 2` fits on <= 2 ranks and predicts the 4-rank points (any sweep flag given "
                        "still wins)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per point (the first 3 are not timed; default 24, 40 with --validation)")
    p.add_argument("--sample-every", type=int, default=None,
                   help="time the stage breakdown (route/dispatch/combine...) on one step in this many (train.log_every; "
                        "default steps/4, 2 with --validation: the all-to-all stages the model is checked on)")
    p.add_argument("--run-root", default=None, help="where the point runs go (default runs/scale)")
    p.add_argument("--out", default=None, help="JSON lines file (default: <run-root>/points.jsonl)")
    p.add_argument("--collect", default=None, metavar="RUN_ROOT", help="only turn existing summaries into JSON lines")
    p.add_argument("--slurm", action="store_true", help="submit the points as SLURM job arrays instead")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default="00:30:00")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: print the job scripts")
    c = p.add_argument_group("emulated cluster (scaling/cluster_sweep.py; needs root)")
    c.add_argument("--cluster", type=_ints, default=None, metavar="NODES_LIST",
                   help="run the points on emulated clusters of these node counts instead (network namespaces, "
                        "tbf-shaped node links, one torchrun agent per node), e.g. --cluster 1,2,4; weak scaling, "
                        "EP from --ep (default 1,2,4,8) and one expert count (--experts, default 8); "
                        "--run-root default runs/cluster-scale")
    c.add_argument("--nproc-per-node", type=int, default=2, help="with --cluster: ranks per emulated node")
    c.add_argument("--link-mbit", type=float, default=100.0, help="with --cluster: each node link's tbf rate, Mbit/s")
    c.add_argument("--placement-nodes", type=int, default=2,
                   help="with --cluster: flat vs node-local placement (configs/hierarchical.yaml shrunk, EP = world) "
                        "measured on this many nodes; 0 leaves it out")
    p.add_argument("overrides", nargs="*", help="config overrides for every point")
    p.set_defaults(func=run_scale)

    r = sub.add_parser("report", help="scaling report (report.md + plots) from msmoe scale's JSON lines",
                       description=scale_report.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--points", default="runs/scale/points.jsonl")
    r.add_argument("--out", default=None, help="directory for report.md and the plots (default: beside --points)")
    r.add_argument("--preset", default=",".join(DEFAULT_PRESETS),
                   help=f"node presets to project onto, side by side (comma list of {', '.join([*PRESETS, MEASURED])}; "
                        "'measured' is this machine's loopback fit; sources in docs/PROJECTION.md)")
    r.add_argument("--node", action="append", default=[], metavar="NAME=GPUS,INTRA_US,INTRA_GBPS,INTER_US,INTER_GBPS",
                   help="a node of your own beside the presets (repeatable), e.g. ours=8,2,3000,6,350: GPUs per "
                        "node, latency per peer (us) and bandwidth per GPU and direction (Gb/s), inside then between")
    r.add_argument("--compute-from", default=None, metavar="SUMMARY_JSON",
                   help="per-rank compute from a `msmoe train` run on the target device (its summary.json, EP=1) "
                        "instead of the measured points")
    r.add_argument("--fit-max-world", type=int, default=None,
                   help="validation: fit the network model on points with at most this many ranks and predict the "
                        "others (default: all but the largest world size)")
    r.add_argument("--placement", default=None, metavar="JSONL",
                   help="flat vs node-local runs of `msmoe scale --cluster` (default: placement.jsonl beside --points)")
    r.add_argument("--fit-max-nodes", type=int, default=2,
                   help="emulated-cluster points: fit the link model on points of at most this many nodes and predict "
                        "the others (default 2)")
    r.add_argument("--fine-slots", type=int, default=None,
                   help="node-local placement: fine experts per coarse slot, Kf (default: the points' top-k)")
    r.add_argument("--layer-sweep", default=None, metavar="JSON",
                   help="a `msmoe bench layer --experts-sweep ... --json` file: adds the layer cost vs expert count")
    r.set_defaults(func=run_report)


SWEEP_DEFAULTS = {"world": [1, 2], "ep": [1, 2], "experts": [4, 8], "modes": "strong,weak", "run_root": "runs/scale",
                  "steps": 24}
VALIDATION_SWEEP = {"world": [1, 2, 4], "ep": [1, 2, 4], "experts": [4], "modes": "strong,weak",
                    "run_root": "runs/validation", "steps": 40, "sample_every": 2}


def _fill_defaults(args) -> None:
    """Unset sweep flags from --validation's sweep, or from the plain defaults."""
    base = VALIDATION_SWEEP if args.validation else SWEEP_DEFAULTS
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.sample_every is not None and not 1 <= args.sample_every <= args.steps:
        raise scale_sweep.ScaleError(f"--sample-every {args.sample_every}: must be between 1 and --steps {args.steps}")


def run_scale(args) -> int:
    if args.cluster is not None:
        return run_cluster_scale(args)
    _fill_defaults(args)
    if args.collect:
        out = args.out or os.path.join(args.collect, "points.jsonl")
        recs = scale_sweep.collect(args.collect, out)
        print(f"{len(recs)} points -> {out}")
        return 0
    spec = scale_sweep.SweepSpec(
        config=args.config, steps=args.steps, run_root=args.run_root, sample_every=args.sample_every,
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
        scale_sweep.run_slurm(points, spec, extra, msmoe_command)
        return 0
    scale_sweep.run_local(points, spec, extra, msmoe_command)
    recs = scale_sweep.collect(spec.run_root, spec.out)
    print(f"{len(recs)} points -> {spec.out}   (next: msmoe report --points {spec.out}"
          + (" --fit-max-world 2)" if args.validation else ")"))
    return 0


def run_cluster_scale(args) -> int:
    from launcher.command import msmoe_target
    from scaling import cluster_sweep

    if args.slurm or args.collect or args.validation or args.world is not None or args.modes is not None:
        raise scale_sweep.ScaleError("--cluster runs its own weak-scaling points on emulated nodes (world = nodes x "
                                     "--nproc-per-node): leave out --slurm, --collect, --validation, --world and "
                                     "--modes")
    experts = args.experts or [8]
    if len(experts) != 1:
        raise scale_sweep.ScaleError(f"--experts {args.experts}: --cluster sweeps one expert count, e.g. --experts 8")
    spec = cluster_sweep.ClusterSweepSpec(
        config=args.config, nodes=tuple(args.cluster), nproc_per_node=args.nproc_per_node, link_mbit=args.link_mbit,
        eps=tuple(args.ep or (1, 2, 4, 8)), experts=experts[0], steps=args.steps or 32,
        sample_every=args.sample_every or 2, placement_nodes=args.placement_nodes or None,
        run_root=args.run_root or "runs/cluster-scale", overrides=tuple(args.overrides))
    if not 1 <= spec.sample_every <= spec.steps:
        raise scale_sweep.ScaleError(f"--sample-every {spec.sample_every}: must be between 1 and --steps {spec.steps}")
    points, placement = cluster_sweep.run_cluster(spec, msmoe_target)
    print(f"{len(points)} points -> {spec.run_root}/points.jsonl, {len(placement)} placement runs -> "
          f"{spec.run_root}/placement.jsonl   (namespaces removed; next: msmoe report --points "
          f"{spec.run_root}/points.jsonl)")
    return 0


def run_report(args) -> int:
    from scaling.points import load_points

    if not os.path.isfile(args.points):
        raise FileNotFoundError(f"--points {args.points}: no such file; make it with `msmoe scale`")
    spec = _projection_spec(args)
    if args.fit_max_nodes < 1:
        raise scale_sweep.ScaleError(f"--fit-max-nodes {args.fit_max_nodes}: must be >= 1 (the most nodes a fitted "
                                     "point may have)")
    try:
        recs = load_points(args.points)
        placement = _placement_points(args)
        path = scale_report.write_scale_report(recs, args.out or os.path.dirname(os.path.abspath(args.points)),
                                               _read_json(args.layer_sweep), spec, placement, args.fit_max_nodes)
    except ValueError as exc:  # a points or --compute-from file that cannot be used, named
        raise scale_sweep.ScaleError(str(exc)) from None
    lines = (cluster_summary(recs, args.fit_max_nodes) if is_cluster(recs) else
             validation_summary(recs, spec.fit_max_world))
    for line in lines:
        print(line)
    print(f"report: {path}")
    return 0


def _placement_points(args) -> list[dict]:
    """``--placement``, or placement.jsonl beside --points where there is one."""
    from scaling.points import load_points

    path = args.placement or os.path.join(os.path.dirname(os.path.abspath(args.points)), "placement.jsonl")
    if args.placement and not os.path.isfile(path):
        raise FileNotFoundError(f"--placement {path}: no such file; `msmoe scale --cluster` writes it beside "
                                "points.jsonl")
    if not os.path.isfile(path) or not os.path.getsize(path):
        return []
    return load_points(path)


def _projection_spec(args) -> ProjectionSpec:
    """The report's projection flags, checked before anything is read."""
    try:
        presets = parse_presets(args.preset) if args.preset else []
        nodes = tuple(parse_node(n) for n in args.node)
        if not presets and not nodes:
            raise ValueError("--preset '': name a preset or give --node")
    except ValueError as exc:
        raise scale_sweep.ScaleError(str(exc)) from None
    if args.compute_from and not os.path.isfile(args.compute_from):
        raise FileNotFoundError(f"--compute-from {args.compute_from}: no such file; give the summary.json of a "
                                "`msmoe train` run (EP=1) on the target device, e.g. runs/<name>/summary.json")
    if args.fit_max_world is not None and args.fit_max_world < 1:
        raise scale_sweep.ScaleError(f"--fit-max-world {args.fit_max_world}: must be >= 1 (the largest world size to fit on)")
    if args.fine_slots is not None and args.fine_slots < 1:
        raise scale_sweep.ScaleError(f"--fine-slots {args.fine_slots}: must be >= 1 (fine experts per coarse slot)")
    return ProjectionSpec(tuple(presets), args.compute_from, args.fit_max_world, args.fine_slots, nodes)


def _read_json(path: str | None):
    if path is None:
        return None
    import json

    with open(path) as fh:
        return json.load(fh)

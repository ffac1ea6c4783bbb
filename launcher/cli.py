"""The ``msmoe`` command line. Each command lives in its own module (parse, build, call); this file
only wires them and turns user errors into one line and exit code 2.

  msmoe --help
  msmoe bench layer
  msmoe bench ep --nproc 2 --ep-sizes 1,2
  msmoe fit --steps 300
  msmoe data synth
  msmoe train --config configs/default.yaml --nproc 2
  msmoe checkpoints verify runs/default
  msmoe eval --run-dir runs/default --nproc 2
  msmoe scale --world 1,2 --ep 1,2 --experts 4,8
  msmoe report --points runs/scale/points.jsonl
  msmoe ablate --configs configs/default.yaml configs/hierarchical.yaml train.steps=100
  msmoe cluster                      # 2 emulated nodes (network namespaces, as root): flat vs node_local
"""

from __future__ import annotations

import argparse
import os
import sys

from launcher import allocator

allocator.tune()  # before torch is imported: see launcher/allocator.py

from common.errors import UserError  # noqa: E402
from launcher import ablate, bench, checkpoints, cluster, convert, data, export, fit, launch, scale, submit, train  # noqa: E402
from launcher import worker_errors, worker_exit  # noqa: E402


def _said_by_every_rank(exc: Exception) -> bool:
    """Errors every rank finds alike (config, sizes, run ownership, rank 0's failed report): only rank 0
    prints them."""
    from common.config import ConfigError
    from parallel.groups import ParallelConfigError
    from training.final_writes import ReportWriteError
    from training.ownership import RunOwnershipError

    return isinstance(exc, (ConfigError, ParallelConfigError, RunOwnershipError, ReportWriteError))


# What exits 2 with its message as one line: every msmoe user error (common/errors.py), and a missing
# file: msmoe raises plain FileNotFoundError for a run, checkpoint or points file that is not there
# (training/checkpoint/verify.py, training/checkpoint/store.py, launcher/scale.py, ...), and open() of a path the user
# gave raises it too.
USER_ERRORS = (UserError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msmoe", description="Distributed MoE trainer for multi-spectral ReID")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    b = sub.add_parser("bench", help="benchmarks (layer, ep)")
    bench_sub = b.add_subparsers(dest="bench_command", metavar="BENCH")
    bench_sub.required = True
    bench.add_parsers(bench_sub)
    fit.add_parser(sub)
    data.add_parser(sub)
    train.add_parsers(sub)
    convert.add_parser(sub)
    export.add_parsers(sub)
    checkpoints.add_parser(sub)
    launch.add_parser(sub)
    submit.add_parser(sub)
    scale.add_parsers(sub)
    ablate.add_parser(sub)
    cluster.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before, between or after options
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        code = int(args.func(args) or 0)
        from parallel.dist import leave_distributed

        status = worker_exit.report(code)  # under `msmoe train --nproc N`: noted for it (launcher/worker_exit.py)
        leave_distributed(code, status)  # returns only when this process joined no process group
        return status
    except USER_ERRORS as exc:  # a bad setting or input: the message says what and how to fix it
        if worker_errors.report(str(exc)):
            pass  # a worker of `msmoe train --nproc N`: the launcher says it once (launcher/worker_errors.py)
        elif not _said_by_every_rank(exc) or os.environ.get("RANK", "0") == "0":
            print(f"msmoe: error: {exc}", file=sys.stderr)
        from parallel.all_to_all import CollectiveError

        if isinstance(exc, CollectiveError):
            from parallel.dist import exit_after_broken_collective

            exit_after_broken_collective(2)
        return worker_exit.report(2)


if __name__ == "__main__":
    sys.exit(main())

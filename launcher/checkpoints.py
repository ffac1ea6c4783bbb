"""``msmoe checkpoints``: look at a run's checkpoints offline (one process, no DeepSpeed engine).

  msmoe checkpoints verify runs/tiny               # table of every step; exit 0 if the newest verifies
  msmoe checkpoints verify runs/tiny/checkpoints
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    c = sub.add_parser("checkpoints", help="check a run's checkpoints against their manifests")
    csub = c.add_subparsers(dest="checkpoints_command", metavar="CHECKPOINTS")
    csub.required = True
    v = csub.add_parser("verify", help="hash every step's files; exit 0 if the newest complete step verifies",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("path", metavar="RUN_DIR_OR_CKPT_DIR")
    v.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    from training.checkpoint.verify import verify_dir

    text, code = verify_dir(args.path)
    print(text)
    return code

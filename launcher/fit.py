"""``msmoe fit``: parse, then train one PatchMoE layer against a random teacher (bench/fit.py)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from bench.fit import FitSpec, run_fit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="train one PatchMoE layer to imitate a random teacher (smoke run)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=16, help="map height = width")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--expert-kind", choices=["seed", "ffn", "conv"], default="seed",
                   help="seed: the thesis's expert (Linear-LN-GELU-Dropout x2 + residual projection)")
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs")
    p.add_argument("--name", default="fit")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    run_fit(FitSpec(**{f.name: getattr(args, f.name) for f in fields(FitSpec)}))
    return 0

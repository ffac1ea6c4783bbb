"""``msmoe fit``: train one PatchMoE layer, single process, to imitate a fixed random teacher.

A quick end-to-end check of the MoE stack (router, dispatch, batched experts, balance loss,
backward, optimizer) on synthetic [B, H, W, C] maps. Writes ``runs/<name>/summary.json``.

  msmoe fit --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tqdm import tqdm

from moe import BalanceConfig, ExpertConfig, PatchMoE, PatchMoEConfig, RouterConfig


def _config(args: argparse.Namespace) -> PatchMoEConfig:
    return PatchMoEConfig(
        dim=args.dim, patch_size=args.patch,
        router=RouterConfig(num_experts=args.experts, top_k=args.top_k),
        expert=ExpertConfig(kind=args.expert_kind, hidden_dim=2 * args.dim, dropout=0.0),
        balance=BalanceConfig(load_balance_coef=0.01),
        capacity_factor=args.capacity_factor,
    )


def run_fit(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    cfg = _config(args)
    teacher = PatchMoE(cfg).eval()
    student = PatchMoE(cfg)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="fit", disable=args.quiet)
    for step in bar:
        x = torch.randn(args.batch, args.size, args.size, args.dim)
        with torch.no_grad():
            target = teacher(x).out
        res = student(x)
        mse = (res.out - target).square().mean()
        loss = mse + res.stats.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(mse))
        bar.set_postfix(mse=f"{float(mse):.4f}", drop=f"{float(res.stats.dropped_fraction):.2f}")
    elapsed = time.perf_counter() - t0
    summary = {
        "steps": args.steps,
        "initial_mse": sum(history[:10]) / min(10, len(history)),
        "final_mse": sum(history[-10:]) / min(10, len(history)),
        "mse_history": history,
        "steps_per_s": args.steps / elapsed,
        "last_routing": res.stats.as_dict(),
        "config": {k: v for k, v in vars(args).items() if k != "func"},
    }
    out_dir = os.path.join(args.out, args.name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    print(
        f"fit: mse {summary['initial_mse']:.4f} -> {summary['final_mse']:.4f} over {args.steps} steps "
        f"({summary['steps_per_s']:.1f} steps/s); expert load {res.stats.load.tolist()}; "
        f"summary in {out_dir}/summary.json"
    )
    return summary


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="train one PatchMoE layer to imitate a random teacher (smoke run)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=16, help="map height = width")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--expert-kind", choices=["seed", "ffn", "conv"], default="seed")
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs")
    p.add_argument("--name", default="fit")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=lambda a: 0 if run_fit(a) else 1)

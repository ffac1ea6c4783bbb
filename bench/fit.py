"""``msmoe fit`` (command line: launcher/fit.py): train one PatchMoE layer, single process, to
imitate a fixed random teacher.

A quick end-to-end check of the MoE stack (router, dispatch, batched experts, balance loss,
backward, optimizer) on synthetic [B, H, W, C] maps. Writes ``runs/<name>/summary.json``.

  msmoe fit --steps 300
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from moe import BalanceConfig, ExpertConfig, PatchMoE, PatchMoEConfig, RouterConfig


@dataclass(frozen=True)
class FitSpec:
    steps: int = 300
    batch: int = 8
    size: int = 16  # map height = width
    dim: int = 32
    experts: int = 8
    top_k: int = 2
    patch: int = 4
    expert_kind: str = "seed"
    capacity_factor: float | None = None  # None: dropless
    lr: float = 3e-3
    seed: int = 0
    out: str = "runs"
    name: str = "fit"
    quiet: bool = False


def _config(spec: FitSpec) -> PatchMoEConfig:
    return PatchMoEConfig(
        dim=spec.dim, patch_size=spec.patch,
        router=RouterConfig(num_experts=spec.experts, top_k=spec.top_k),
        expert=ExpertConfig(kind=spec.expert_kind, hidden_dim=2 * spec.dim, dropout=0.0),
        balance=BalanceConfig(load_balance_coef=0.01),
        capacity_factor=spec.capacity_factor,
    )


def run_fit(spec: FitSpec) -> dict:
    torch.manual_seed(spec.seed)
    cfg = _config(spec)
    teacher = PatchMoE(cfg).eval()
    student = PatchMoE(cfg)
    opt = torch.optim.AdamW(student.parameters(), lr=spec.lr)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(spec.steps), desc="fit", disable=spec.quiet)
    for step in bar:
        x = torch.randn(spec.batch, spec.size, spec.size, spec.dim)
        with torch.no_grad():
            target = teacher(x).out
        res = student(x)
        mse = (res.out - target).square().mean()
        loss = mse + res.stats.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(mse.detach()))
        bar.set_postfix(mse=f"{float(mse):.4f}", drop=f"{float(res.stats.dropped_fraction):.2f}")
    elapsed = time.perf_counter() - t0
    summary = {
        "steps": spec.steps,
        "initial_mse": sum(history[:10]) / min(10, len(history)),
        "final_mse": sum(history[-10:]) / min(10, len(history)),
        "mse_history": history,
        "steps_per_s": spec.steps / elapsed,
        "last_routing": res.stats.as_dict(),
        "config": asdict(spec),
    }
    out_dir = os.path.join(spec.out, spec.name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    print(
        f"fit: mse {summary['initial_mse']:.4f} -> {summary['final_mse']:.4f} over {spec.steps} steps "
        f"({summary['steps_per_s']:.1f} steps/s); expert load {res.stats.load.tolist()}; "
        f"summary in {out_dir}/summary.json"
    )
    return summary

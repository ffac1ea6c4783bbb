"""The ablation table (``msmoe ablate``; command line in launcher/ablate.py): train a list of configs
and put accuracy, cost and expert-usage figures side by side.

Each config is a real ``msmoe train`` run under ``<run_root>/<its name>``, here one after the
other (:func:`run_all`) or as one SLURM job each through ``msmoe submit`` (:func:`submit_all`:
all queued at once, then waited for), both through the campaign runner (scaling/campaign.py). The sweep is resumable: a run that finished (its
``COMPLETE`` marker) is not redone, one that was interrupted continues from its checkpoint
(``--auto-resume``), one whose job is still queued or running is waited for, not resubmitted. The table goes to ``<out>/ablation.md`` (each row links
its run's report), ``ablation.csv`` and ``ablation.png``.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

from common.errors import UserError
from scaling.campaign import Campaign, Command, Run, job_active
from training.checkpoint.store import COMPLETE

DEFAULT_CONFIGS = ("configs/default.yaml", "configs/hierarchical.yaml", "configs/ablations/streams.yaml",
                   "configs/ablations/modal_given.yaml", "configs/modal.yaml", "configs/ablations/scales2.yaml",
                   "configs/ablations/scales4.yaml", "configs/ablations/scales5.yaml", "configs/ablations/gate1.yaml",
                   "configs/ablations/gate3.yaml", "configs/ablations/temp0.5.yaml", "configs/ablations/temp2.0.yaml")
ROUTING_CONFIGS = tuple(f"configs/ablations/routing_{choice}_e{e}.yaml" for e in (4, 16, 64)
                        for choice in ("token", "expert"))  # expert vs token choice at equal active FLOPs
SETS = {"default": DEFAULT_CONFIGS, "routing": ROUTING_CONFIGS}
COLUMNS = ("run", "config", "model", "map", "rank1", "samples_per_s", "params_total", "params_active_per_patch",
           "flops_per_image", "latency_ms_per_image", "peak_train_mem_mb", "peak_infer_mem_mb", "activation_rate", "usage_variance",
           "gate_stability", "fusion_gate_stability", "unrouted", "elapsed_s")


def model_kind(model: dict) -> str:
    """streams / blocks / head, e.g. "per_modality / hierarchical (given) / hierarchical"."""
    blocks = model.get("moe_kind", "patch")
    router = (model.get("patch_moe") or {}).get("router") or {}
    if blocks == "patch" and router.get("choice") == "expert":
        blocks += f" (expert choice, E={router.get('num_experts')})"
    elif blocks == "patch" and "num_experts" in router:
        blocks += f" (E={router['num_experts']})"
    if blocks == "hierarchical":
        blocks += f" ({model.get('hierarchical', {}).get('coarse_mode', 'learned')})"
    return f"{model.get('streams', 'fused')} / {blocks} / {model.get('fusion', 'flat')}"


class AblationError(UserError, RuntimeError):
    """A run of the sweep failed; the message holds the end of its output."""


@dataclass(frozen=True)
class AblateSpec:
    configs: tuple[str, ...] = DEFAULT_CONFIGS
    overrides: tuple[str, ...] = ()  # for every run, e.g. train.steps=100 for a quick table
    nproc: int = 2
    run_root: str = "runs/ablation"
    out: str = "runs/ablation"


def run_name(config: str, overrides: tuple[str, ...]) -> str:
    from training.config import load_config

    return load_config(config, list(overrides)).name


def _campaign(spec: AblateSpec, command: Command) -> Campaign:
    return Campaign(command, log_dir=spec.run_root, error=AblationError, what="ablation run")


def _finished(run_root: str, name: str) -> bool:
    return os.path.isfile(os.path.join(run_root, name, COMPLETE))


def run_all(spec: AblateSpec, command: Command) -> list[str]:
    """Train every config not finished yet (``msmoe train --nproc N`` each, through ``command``:
    launcher/command.py ``msmoe_command``); returns the run names in table order."""
    runs = [Run(name, f"{name} ({config})", ("train", "--config", config, "--nproc", str(spec.nproc), "--no-progress",
                                             "--auto-resume", *spec.overrides, f"out_dir={spec.run_root}"))
            for config, name in zip(spec.configs, _names(spec))]
    _campaign(spec, command).run_all(runs, finished=lambda r: _finished(spec.run_root, r.name),
                                     result=lambda r, out: out.strip().splitlines()[-2])  # the run's result line
    return [r.name for r in runs]


def submit_all(spec: AblateSpec, command: Command, submit_args: tuple[str, ...], *, wait: bool = True,
               poll_s: float = 10.0) -> list[str]:
    """One SLURM job per run not finished yet (``msmoe submit <submit_args> -- --config ...``); a run
    whose job is still in the queue keeps it. With ``wait``, return when every run finished (raise
    AblationError naming the job and its log when one leaves the queue unfinished)."""
    camp, names, jobs = _campaign(spec, command), _names(spec), {}
    for i, (config, name) in enumerate(zip(spec.configs, names), 1):
        job_file = os.path.join(spec.run_root, name, "slurm_job_id")
        if _finished(spec.run_root, name):
            print(f"[{i}/{len(spec.configs)}] {name}: finished before, kept", flush=True)
            continue
        old = open(job_file).read().strip() if os.path.isfile(job_file) else None
        if old and job_active(old):
            print(f"[{i}/{len(spec.configs)}] {name}: job {old} still queued or running, kept", flush=True)
            jobs[name] = old
            continue
        out = camp.submit(name, submit_args, ["--config", config, *spec.overrides, f"out_dir={spec.run_root}"])
        jobs[name] = out.strip().splitlines()[-1]
        print(f"[{i}/{len(spec.configs)}] {name} ({config}): submitted job {jobs[name]}", flush=True)
    if wait:
        camp.wait_for_jobs(jobs, lambda name: _finished(spec.run_root, name),
                           lambda name, job: os.path.join(spec.run_root, name, f"slurm-{job}.out"), poll_s)
    return names


def _names(spec: AblateSpec) -> list[str]:
    return [run_name(config, spec.overrides) for config in spec.configs]


def row(run_root: str, name: str) -> dict:
    """One table row from a finished run's summary.json."""
    with open(os.path.join(run_root, name, "summary.json")) as fh:
        s = json.load(fh)
    cost = s.get("model_cost") or {}
    params, inf = cost.get("parameters", {}), cost.get("inference", {})
    layers = list((s.get("moe_usage") or {}).get("layers", {}).values())
    mean = (lambda key: sum(v[key] for v in layers) / len(layers) if layers else None)  # noqa: E731
    fusion = (s.get("moe_usage") or {}).get("fusion_gate") or {}
    peak = s.get("peak_mem_mb_per_rank")
    return {"run": name, "config": s["config"]["name"], "model": model_kind(s["config"]["model"]),
            "map": s["map"], "rank1": s["rank1"], "peak_train_mem_mb": max(peak) if peak else None,
            "peak_infer_mem_mb": inf.get("peak_mem_mb"),
            "samples_per_s": s["samples_per_s"], "params_total": params.get("total"),
            "params_active_per_patch": params.get("active_per_patch"), "flops_per_image": inf.get("flops_per_image"),
            "latency_ms_per_image": inf.get("latency_ms_per_image"), "activation_rate": mean("activation_rate"),
            "usage_variance": mean("usage_variance"), "gate_stability": mean("gate_stability"),
            "fusion_gate_stability": fusion.get("gate_stability"), "unrouted": unrouted(s), "elapsed_s": s["elapsed_s"]}


def unrouted(summary: dict) -> float:
    """The share of routed patches that no expert computed (last interval, mean over the MoE layers):
    untaken by any expert under expert choice, dropped over capacity under token choice."""
    coverage = summary.get("patch_coverage") or {}
    if coverage:
        return sum(c[0] for c in coverage.values()) / len(coverage)
    return summary.get("dropped_fraction") or 0.0


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def write_table(rows: list[dict], out: str, run_root: str) -> str:
    """ablation.md, .csv and .png in ``out``; returns the Markdown path."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ablation.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["# Ablation", "", "Accuracy, cost and expert usage per run (MoE figures: mean over the MoE layers; "
             "activation: experts with at least half an even share of the patches; stability: standard deviation "
             "of the shares across logging intervals; model: streams / MoE blocks / head fusion).", "",
             "| run | model | mAP | Rank-1 | samples/s | params (active/patch) | MFLOP/image | ms/image | peak MiB train | "
             "infer | activation | usage var | gate stab. | fusion gate stab. | unrouted |", "|---" * 15 + "|"]
    for r in rows:
        report = os.path.relpath(os.path.join(run_root, r["run"], "report.md"), out)
        lines.append(
            f"| [{r['run']}]({report}) | {r['model']} | {r['map']:.1%} | {r['rank1']:.1%} | {r['samples_per_s']:.1f} | "
            f"{_fmt(r['params_total'], ',')} ({_fmt(r['params_active_per_patch'], ',')}) | "
            f"{_fmt(r['flops_per_image'] and r['flops_per_image'] / 1e6, '.1f')} | "
            f"{_fmt(r['latency_ms_per_image'], '.2f')} | {_fmt(r['peak_train_mem_mb'], '.0f')} | "
            f"{_fmt(r['peak_infer_mem_mb'], '.0f')} | "
            f"{_fmt(r['activation_rate'], '.0%')} | "
            f"{_fmt(r['usage_variance'], '.4f')} | {_fmt(r['gate_stability'], '.3f')} | "
            f"{_fmt(r['fusion_gate_stability'], '.3f')} | {_fmt(r.get('unrouted'), '.1%')} |")
    lines += ["", "Unrouted: the share of routed patches no expert computed (expert choice: taken by none; token "
              "choice: dropped over capacity; 0 when dropless).", "", "![ablation](ablation.png)", ""]
    _plot(rows, os.path.join(out, "ablation.png"))
    path = os.path.join(out, "ablation.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    return path


def _plot(rows: list[dict], path: str) -> None:
    from common.plots import pyplot

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [r["run"] for r in rows]
    a.barh(names, [100 * r["map"] for r in rows], color="tab:blue")
    a.set_xlabel("mAP (%)")
    a.invert_yaxis()
    b.barh(names, [(r["flops_per_image"] or 0) / 1e6 for r in rows], color="tab:gray")
    b.set_xlabel("MFLOP per image (inference)")
    b.invert_yaxis()
    b.set_yticklabels([])
    fig.suptitle("ablation: accuracy and cost per run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

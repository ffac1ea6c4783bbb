"""The scaling report (``msmoe report``; command line in launcher/scale.py): JSON lines from
``msmoe scale`` -> ``report.md`` + PNG plots.

  msmoe report --points runs/scale/points.jsonl --out runs/scale
  msmoe report --points points.jsonl --preset h100-ndr,a100-hdr     # project onto those nodes
  msmoe report --points points.jsonl --preset h100-ndr --compute-from runs/gpu/summary.json   # with H100 compute
  msmoe report --points runs/validation/points.jsonl --fit-max-world 2   # fit on <= 2 ranks, predict the rest

Measured: throughput vs ranks, strong and weak scaling efficiency, the step-time breakdown,
all-to-all volume, peak memory per rank, expert-load heatmaps, the environment.

Modelled (labelled so everywhere): the two-level all-to-all model and node presets of
scaling/comm_model.py, the projection and layout decision of scaling/projection.py (sections in
scaling/projection_report.py), and the validation of the fitted model on held-out points.
"""

from __future__ import annotations

import os

import numpy as np

from common.plots import pyplot  # matplotlib on the Agg backend, as for run reports
from scaling.cluster_report import held_out_section, is_cluster, placement_section
from scaling.projection import ProjectionSpec, project, projection_inputs
from scaling.projection_report import projection_section, validation_section
from scaling.points import efficiency, point_label

STAGES = ("data", "route", "dispatch", "experts", "combine", "forward_other", "backward", "optimizer")


def _series(recs: list[dict]):
    """(mode, ep, experts) -> records sorted by world size; world 1 joins every mode's series."""
    out: dict[tuple, list[dict]] = {}
    for r in recs:
        modes = ("strong", "weak") if r["world_size"] == 1 else (r["mode"],)
        for m in modes:
            out.setdefault((m, r["ep_size"], r["num_experts"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["world_size"]) for k, v in out.items()}


# ------------------------------------------------------------------ plots
def plot_throughput(recs, path):
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for (mode, ep, e), rs in sorted(_series(recs).items()):
        i = 0 if mode == "strong" else 1
        ax[i].plot([r["world_size"] for r in rs], [r["samples_per_s"] for r in rs], marker="o", label=f"EP{ep} E{e}")
    for i, mode in enumerate(("strong", "weak")):
        ax[i].set_xlabel("ranks")
        ax[i].set_ylabel("samples / s")
        ax[i].set_title(f"throughput, {mode} scaling" + (" (global batch fixed)" if mode == "strong"
                                                          else " (per-rank batch fixed)"))
        ax[i].grid(alpha=0.3)
        if ax[i].lines:
            ax[i].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_efficiency(rows, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [r["point"] for r in rows]
    ax.bar(range(len(rows)), [100 * r["efficiency"] for r in rows],
           color=["tab:blue" if r["mode"] == "strong" else "tab:orange" for r in rows])
    ax.axhline(100, color="gray", ls="--", lw=1)
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("scaling efficiency (%)")
    ax.set_title("measured scaling efficiency (blue strong, orange weak)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_breakdown(recs, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(recs) + 3), 4.5))
    bottom = np.zeros(len(recs))
    for stage in STAGES:
        vals = np.array([r["step_time_ms"].get(stage, 0.0) for r in recs])
        ax.bar(range(len(recs)), vals, bottom=bottom, label=stage)
        bottom += vals
    ax.set_xticks(range(len(recs)), [point_label(r) for r in recs], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ms per step")
    ax.set_title("step-time breakdown (route/dispatch/experts/combine are inside the forward)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(recs, values, ylabel, title, path, stacked_labels=None):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(recs) + 3), 4))
    x = np.arange(len(recs))
    values = np.asarray(values, float)
    if values.ndim == 1:
        ax.bar(x, values)
    else:
        width = 0.8 / values.shape[1]
        for j in range(values.shape[1]):
            ax.bar(x + j * width - 0.4 + width / 2, values[:, j], width,
                   label=stacked_labels[j] if stacked_labels else f"rank {j}")
        ax.legend(fontsize=7)
    ax.set_xticks(x, [point_label(r) for r in recs], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_load(recs, path):
    plt = pyplot()
    emax = max(len(f) for r in recs for f in r["expert_load_fraction"].values()) if recs else 1
    rows, labels = [], []
    for r in recs:
        for layer, f in r["expert_load_fraction"].items():
            rows.append(list(f) + [np.nan] * (emax - len(f)))
            labels.append(f"{point_label(r)} {layer}")
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * emax + 3), 0.3 * len(rows) + 1.5))
    im = ax.imshow(np.asarray(rows, float), aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title("share of routed patches per expert (whole run)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_projection(projs: dict, path):
    """``projs``: preset name -> scaling.projection.project rows."""
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, proj in projs.items():
        g = [p["gpus"] for p in proj]
        ax[0].plot(g, [p["samples_per_s"] for p in proj], marker="o", ls="--", label=name)
        ax[1].plot(g, [100 * p["efficiency"] for p in proj], marker="o", ls="--", label=name)
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xlabel("GPUs (ranks)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax[0].set_yscale("log")
    ax[0].set_ylabel("samples / s")
    ax[0].set_title("MODEL: projected weak-scaling throughput")
    ax[1].set_ylim(0, 105)
    ax[1].set_ylabel("efficiency (%)")
    ax[1].set_title("MODEL: two-level all-to-all per preset, not measured")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ report
def write_scale_report(recs: list[dict], out_dir: str, layer_sweep: dict | None = None,
                       projection: ProjectionSpec = ProjectionSpec(), placement: list[dict] | None = None,
                       fit_max_nodes: int = 2) -> str:
    """``layer_sweep``: a ``msmoe bench layer --experts-sweep ... --json`` file's content (a section
    on the layer's cost against the expert count); ``projection``: the modelled sections' options.
    Points from an emulated cluster (``msmoe scale --cluster``) get the cluster's sections instead of the
    one-level validation: its link fit on <= ``fit_max_nodes`` nodes, the held-out points, and the
    ``placement`` runs (flat vs node-local)."""
    os.makedirs(out_dir, exist_ok=True)
    recs = sorted(recs, key=lambda r: (r["mode"], r["world_size"], r["ep_size"], r["num_experts"]))
    eff = efficiency(recs)
    cost, presets, why_no_projection = projection_inputs(recs, projection)
    projs = {p.name: project(cost, p) for p in presets} if cost else {}
    write_plots(recs, eff, projs, out_dir)
    L = _measured_section(recs) + _stages_section(recs, eff)
    if layer_sweep:
        L += _layer_sweep_section(layer_sweep)
    if cost:
        L += projection_section(cost, presets, out_dir)
        L += ["![projection](projection_model.png)", ""]
    else:
        L += ["## Projection — not made", "", why_no_projection, ""]
    if is_cluster(recs):
        L += held_out_section(recs, fit_max_nodes) + placement_section(placement or [], recs, fit_max_nodes)
    else:
        L += validation_section(recs, projection.fit_max_world)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")
    return path


def write_plots(recs: list[dict], eff: list[dict], projs: dict, out_dir: str) -> None:
    """The report's figures into ``out_dir`` (efficiency and projection only when there are some)."""
    plots = {"throughput.png": lambda p: plot_throughput(recs, p),
             "breakdown.png": lambda p: plot_breakdown(recs, p),
             "a2a_volume.png": lambda p: plot_bars(
                 recs, [[r["a2a_bytes_per_step"]["total"] / 2**20, r["a2a_bytes_per_step"]["offrank"] / 2**20]
                        for r in recs], "MiB per step and rank", "all-to-all volume per step (rank 0)", p,
                 ["handed to all-to-all", "left the rank"]),
             "memory.png": lambda p: plot_bars(
                 recs, _pad([r["peak_mem_mb_per_rank"] for r in recs]), "peak MiB", "peak memory per rank", p),
             "expert_load.png": lambda p: plot_load(recs, p)}
    if eff:
        plots["efficiency.png"] = lambda p: plot_efficiency(eff, p)
    if projs:
        plots["projection_model.png"] = lambda p: plot_projection(projs, p)
    for name, fn in plots.items():
        fn(os.path.join(out_dir, name))


def _measured_section(recs: list[dict]) -> list[str]:
    """The environment and the table of measured points."""
    L = ["# msmoe throughput scaling report", ""]
    L += ["## Environment", "", "| | |", "|---|---|"]
    for k, v in recs[0].get("env", {}).items():
        L.append(f"| {k} | {v} |")
    L.append(f"| device / backend | {recs[0]['device']} / {recs[0]['backend']} |")
    L += ["", f"{len(recs)} measured points; each is a short `msmoe train` run (first 3 steps not timed). "
          "On one machine the ranks share its cores (threads/rank): a 1-rank point may use them all, so "
          "efficiency against it also measures the split of the cores, not only communication.", ""]
    L += ["## Measured points", "",
          "| mode | ranks | " + ("nodes | " if is_cluster(recs) else "") +
          "threads/rank | EP | experts | global batch | samples/s | patches/s/rank | step ms | "
          "a2a MiB/step (off-rank) | peak MiB (max rank) | load max/mean | dropped |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if is_cluster(recs) else "")]
    for r in recs:
        imb = max(r["load_imbalance"].values()) if r["load_imbalance"] else 0.0
        nodes = f"{r.get('nodes') or '-'} | " if is_cluster(recs) else ""
        L.append(f"| {r['mode']} | {r['world_size']} | {nodes}{r.get('threads_per_rank') or '-'} | {r['ep_size']} | "
                 f"{r['num_experts']} | {r['global_batch']} | "
                 f"{r['samples_per_s']:.1f} | {r['patches_per_s_per_rank']:.0f} | {r['step_time_ms']['step']:.1f} | "
                 f"{r['a2a_bytes_per_step']['offrank'] / 2**20:.2f} | {max(r['peak_mem_mb_per_rank']):.0f} | "
                 f"{imb:.2f} | {r['dropped_fraction']:.1%} |")
    return L + ["", "![throughput](throughput.png)", ""]


def _stages_section(recs: list[dict], eff: list[dict]) -> list[str]:
    """Efficiency (when measured), the step-time breakdown, all-to-all volume, memory and expert load."""
    L = []
    if eff:
        L += ["## Scaling efficiency (measured)", "", "| point | mode | efficiency |", "|---|---|---|"]
        L += [f"| {e['point']} | {e['mode']} | {e['efficiency']:.1%} |" for e in eff]
        L += ["", "![efficiency](efficiency.png)", ""]
    L += ["## Step-time breakdown (ms per step)", "",
          "| point | " + " | ".join(STAGES) + " | step |", "|---|" + "---|" * (len(STAGES) + 1)]
    for r in recs:
        ms = r["step_time_ms"]
        L.append(f"| {point_label(r)} | " + " | ".join(f"{ms.get(s, 0.0):.1f}" for s in STAGES) + f" | {ms['step']:.1f} |")
    return L + ["", "![breakdown](breakdown.png)", "", "## All-to-all volume and memory", "",
                "![a2a](a2a_volume.png)", "", "![memory](memory.png)", "", "## Expert load", "",
                "![load](expert_load.png)", ""]


def _layer_sweep_section(layer_sweep: dict) -> list[str]:
    from bench.layer import LayerBenchSpec, sweep_table

    spec = LayerBenchSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in layer_sweep["args"].items()
                             if k in LayerBenchSpec.__dataclass_fields__})
    return ["## Layer cost against the expert count (equal active FLOPs)", "",
            "One MoE layer forward + backward (`msmoe bench layer --experts-sweep`): more experts at the same "
            "active compute per point should cost the same.", "", *sweep_table(spec, layer_sweep["sweep"]), ""]


def _pad(rows: list[list[float]]) -> list[list[float]]:
    n = max(len(r) for r in rows)
    return [list(r) + [0.0] * (n - len(r)) for r in rows]

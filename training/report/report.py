"""A run's human report: ``report.md`` plus PNG plots, written from its ``summary.json`` dict.

Plots: loss curves, CMC (trained vs untrained), one expert-load heatmap per PatchMoE block
(experts x training progress, share of routed patches), the multi-scale fusion gate weights
(the thesis fusion's expert-weight heatmap: scales x samples), and the step-time breakdown;
per modality (training/report/report_modal.py): modality-group load and the hierarchical head's weights.
"""

from __future__ import annotations

import os

import numpy as np

from common.files import write_text_atomic
from common.plots import PLOTS_ENV, plots_wanted, pyplot, run_plot, save_figure
from training.report.report_modal import modal_section


def _smooth(y, n: int = 10):
    y = np.asarray(y, dtype=float)
    if len(y) < n:
        return y
    return np.convolve(y, np.ones(n) / n, mode="valid")


@run_plot
def plot_losses(summary: dict, path: str) -> None:
    plt = pyplot()
    h = summary["history"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(1, len(h["loss"]) + 1)
    for key, label in (("loss", "total"), ("id", "ID (label-smoothed CE)"), ("triplet", "batch-hard triplet")):
        y = _smooth(h[key])
        ax[0].plot(steps[len(steps) - len(y):], y, label=label)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("loss (moving mean, 10 steps)")
    ax[0].legend()
    ax[0].set_title("training losses")
    ax[1].plot(steps, h["aux"], color="tab:purple", label="MoE balance losses")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("aux loss")
    ax2 = ax[1].twinx()
    ax2.plot(steps, h["lr"], color="tab:gray", ls="--", label="lr")
    ax2.set_ylabel("learning rate")
    ax[1].set_title("balance loss and learning rate")
    fig.tight_layout()
    save_figure(fig, path)


@run_plot
def plot_cmc(summary: dict, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ranks = np.arange(1, len(summary["cmc"]) + 1)
    ax.plot(ranks, summary["cmc"], marker="o", ms=3, label=f"trained (mAP {summary['map']:.1%})")
    if summary.get("untrained"):
        u = summary["untrained"]
        ax.plot(ranks, u["cmc"], marker="o", ms=3, ls="--", label=f"untrained (mAP {u['map']:.1%})")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("CMC curve (query vs gallery, same-camera matches excluded)")
    fig.tight_layout()
    save_figure(fig, path)


@run_plot
def plot_expert_load(summary: dict, layer: int, name: str, path: str) -> None:
    plt = pyplot()
    h = summary["history"]
    load = np.asarray([interval[layer] for interval in h["load"]], dtype=float)  # [T, E]
    share = load / np.maximum(load.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 0.4 * share.shape[1] + 1.8))
    im = ax.imshow(share.T, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    e = share.shape[1]
    ax.set_yticks(range(e), [f"expert {i}" for i in range(e)])
    ticks = np.linspace(0, len(h["load_steps"]) - 1, min(8, len(h["load_steps"]))).astype(int)
    ax.set_xticks(ticks, [str(h["load_steps"][t]) for t in ticks])
    ax.set_xlabel("step")
    ax.set_title(f"{name}: share of routed patches per expert (1/E = {1 / e:.2f} is balanced)")
    fig.colorbar(im, ax=ax, label="share")
    fig.tight_layout()
    save_figure(fig, path)


@run_plot
def plot_fusion_weights(weights_NS: np.ndarray, scales, path: str, max_samples: int = 40) -> None:
    """The multi-scale fusion's gate weight of each scale expert (4/8/16 windows) per sample."""
    plt = pyplot()
    w = np.asarray(weights_NS)[:max_samples]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(scales) + 1.8))
    im = ax.imshow(w.T, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(scales)), [f"{s}x{s}" for s in scales])
    ax.set_xlabel("query sample")
    ax.set_title("multi-scale MoE fusion: expert weights per sample")
    fig.colorbar(im, ax=ax, label="weight")
    fig.tight_layout()
    save_figure(fig, path)


@run_plot
def plot_step_time(summary: dict, path: str) -> None:
    plt = pyplot()
    st = summary["step_time_ms"]
    outer = [k for k in ("data", "forward", "backward", "optimizer") if k in st]
    inner = [k for k in ("route", "dispatch", "experts", "combine") if k in st]
    fig, ax = plt.subplots(figsize=(8, 2.8))
    left = 0.0
    for k in outer:
        ax.barh(1, st[k], left=left, label=k)
        left += st[k]
    left = st.get("data", 0.0)
    for k in inner:
        ax.barh(0, st[k], left=left, label=f"MoE {k}", hatch="//")
        left += st[k]
    ax.set_yticks([0, 1], ["MoE stages\n(inside forward)", "step"])
    ax.set_xlabel("ms per step (mean)")
    if ax.get_legend_handles_labels()[0]:  # nothing timed in very short runs
        ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    ax.set_title(f"step time: {st.get('step', 0):.1f} ms")
    fig.tight_layout()
    save_figure(fig, path)


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def _count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def _cost_and_routing(summary: dict) -> list[str]:
    """The thesis's evaluation metrics: model cost, and how the experts were used."""
    cost, usage = summary.get("model_cost"), summary.get("moe_usage") or {}
    lines = ["## Model cost and expert usage", ""]
    if cost:
        p, inf = cost["parameters"], cost["inference"]
        mem = summary.get("peak_mem_mb_per_rank") or []
        lines += ["| parameters (total) | active per patch | FLOPs per image (inference, counted) | "
                  "latency per image | peak memory (training, max rank) | peak tensor memory (inference, max rank) |",
                  "|---|---|---|---|---|---|",
                  f"| {_count(p['total'])} ({_count(p['experts'])} in experts) | {_count(p['active_per_patch'])} | "
                  f"{_count(inf['flops_per_image'])} | {inf['latency_ms_per_image']:.2f} ms "
                  f"(batch of {inf['batch_per_rank']} per rank) | {max(mem):.0f} MiB | "
                  f"{inf.get('peak_mem_mb', float('nan')):.1f} MiB |" if mem else "| | | | | | |", ""]
    rows = {**usage.get("layers", {}), **({"fusion gate (scales)": usage["fusion_gate"]} if "fusion_gate" in usage
                                          else {})}
    if rows:
        lines += [f"Expert usage over the run (activation: at least {usage['threshold_share']:.0%} of an even share; "
                  "stability: standard deviation of the shares across logging intervals, 0 = unchanged):", "",
                  "| layer | usage variance | activation rate | gate stability |", "|---|---|---|---|"]
        lines += [f"| {name} | {v['usage_variance']:.4f} | {v['activation_rate']:.0%} | {v['gate_stability']:.3f} |"
                  for name, v in rows.items()]
        lines.append("")
    return lines


def write_report(summary: dict, run_dir: str, fusion_weights: np.ndarray | None = None) -> list[str]:
    """Write the plots (unless switched off: common/plots.py) and report.md into ``run_dir``;
    returns the files written."""
    files = []

    def out(name):
        files.append(os.path.join(run_dir, name))
        return files[-1]

    model = summary["config"]["model"]
    scales = model["multiscale"].get("scales", [4, 8, 16])
    flat_fusion = fusion_weights is not None and model.get("fusion", "flat") == "flat"
    _plots(summary, fusion_weights if flat_fusion else None, scales, out)
    lines = _retrieval(summary, model) + _training(summary) + _expert_load(summary)
    lines += _cost_and_routing(summary) + _missing(summary, model)
    lines += modal_section(summary, run_dir, fusion_weights, out)
    if flat_fusion:
        lines += _fusion(summary, scales)
    lines += _data(summary)
    if not plots_wanted():
        lines = [line for line in lines if not line.startswith("![")]
        lines.insert(1, f"\n_Plots not drawn ({PLOTS_ENV}=0)._")
    write_text_atomic(out("report.md"), "\n".join(lines))
    return [f for f in files if os.path.exists(f)]


def _plots(summary: dict, flat_fusion_weights, scales, out) -> None:
    """The run's plots; the fusion weights' only for the flat (multi-scale) fusion."""
    plot_losses(summary, out("loss.png"))
    plot_cmc(summary, out("cmc.png"))
    plot_step_time(summary, out("step_time.png"))
    for i, name in enumerate(summary["expert_load"]):
        plot_expert_load(summary, i, name, out(f"expert_load_{name}.png"))
    if flat_fusion_weights is not None:
        plot_fusion_weights(flat_fusion_weights, scales, out("fusion_weights.png"))


def _retrieval(summary: dict, model: dict) -> list[str]:
    """The title, what ran, and the retrieval table (trained, and untrained when evaluated)."""
    u = summary.get("untrained")
    lines = [
        f"# Run `{summary['name']}`",
        "",
        f"{summary['steps']} steps on {summary['world_size']} rank(s) ({summary['device']}, {summary['backend']}, "
        f"launcher: {summary['launcher']}), expert-parallel size {summary['ep_size']}, "
        f"{summary['num_experts']} experts in each of {summary['moe_layers']} "
        f"{'hierarchical' if model.get('moe_kind') == 'hierarchical' else 'PatchMoE'} block(s)"
        + (f", streams {model['streams']}" if model.get("streams", "fused") != "fused" else "")
        + (", hierarchical head fusion" if model.get("fusion", "flat") != "flat" else "")
        + f". Wall time {summary['elapsed_s']:.0f} s.",
        "",
        "## Retrieval (query vs gallery, same-identity same-camera gallery images excluded)",
        "",
        "| model | mAP | Rank-1 | Rank-5 | Rank-10 |",
        "|---|---|---|---|---|",
        f"| trained | {_pct(summary['map'])} | {_pct(summary['rank1'])} | {_pct(summary['rank5'])} | {_pct(summary['rank10'])} |",
    ]
    if u:
        lines.append(f"| untrained (same init) | {_pct(u['map'])} | {_pct(u['rank1'])} | {_pct(u['rank5'])} | {_pct(u['rank10'])} |")
    return lines + ["", f"{summary['num_valid_queries']} queries evaluated, {summary['num_skipped_queries']} "
                        "skipped (no match left).", "", "![CMC](cmc.png)", ""]


def _training(summary: dict) -> list[str]:
    """Losses and throughput; the step time per stage and the all-to-all payload."""
    st = summary["step_time_ms"]
    lines = ["## Training", "",
             f"Final loss {summary['final_loss']:.4f} (first {summary['loss_history'][0]:.4f}). "
             f"Throughput {summary['samples_per_s']:.1f} samples/s (startup steps excluded).",
             "", "![losses](loss.png)", "", "## Step time (ms, mean per step)"]
    timing = summary.get("stage_timing") or {}
    if timing.get("mode") == "sampled":
        lines.append(f"Stages measured on {timing['sampled_steps']} sampled steps (one per logging interval; "
                     "synchronised on GPUs); `step` is the mean over every timed step.\n")
    lines += ["", "| stage | ms |", "|---|---|"]
    for k in ("data", "forward", "route", "dispatch", "experts", "combine", "backward", "optimizer", "step"):
        if k in st:
            prefix = "&nbsp;&nbsp;MoE " if k in ("route", "dispatch", "experts", "combine") else ""
            lines.append(f"| {prefix}{k} | {st[k]:.2f} |")
    a2a = summary.get("a2a_bytes_per_step") or {}
    if a2a:
        lines += ["", f"All-to-all payload per step: {a2a['total'] / 1e6:.3f} MB handed to all-to-all "
                      f"({a2a['offrank'] / 1e6:.3f} MB left the rank; forward {a2a['forward'] / 1e6:.3f} MB, "
                      f"backward {a2a['backward'] / 1e6:.3f} MB)."]
    lines += _transport_line(summary)
    return lines + ["", "![step time](step_time.png)", ""]


def _transport_line(summary: dict) -> list[str]:
    """One line: the hierarchical blocks' transport, the nodes, and rank 0's cross-node bytes per step."""
    a2a, nodes = summary.get("a2a_bytes_per_step") or {}, summary.get("nodes")
    if "transport" not in summary:  # a summary written before train.transport existed
        return []
    where = (f"{nodes} node(s) x {summary['world_size'] // nodes} rank(s)" if nodes else
             "ranks not numbered node by node (nodes unknown)")
    cross = (f"; cross-node all-to-all payload per step {a2a['cross_node'] / 1e6:.3f} MB (rank 0's sends to "
             "ranks of other nodes)" if "cross_node" in a2a else "")
    return ["", f"Transport: {summary['transport']} ({where}){cross}."]


def _expert_load(summary: dict) -> list[str]:
    lines = ["## Expert load", "", "| block | share of routed patches per expert (whole run) |", "|---|---|"]
    for name, v in summary["expert_load"].items():
        lines.append(f"| {name} | " + " ".join(f"{x:.2f}" for x in v["fraction"]) + " |")
    lines += ["", f"Dropped fraction (last interval): {summary['dropped_fraction']:.3f}; "
                  f"active experts per patch: {summary['active_experts_per_patch']}.", ""]
    coverage = summary.get("patch_coverage") or {}
    if coverage:  # expert choice: patches are not dropped, they may go untaken
        lines += ["Expert choice, share of routed patches taken by 0 / 1 / 2 / 3 / 4+ experts (last interval):", ""]
        lines += [f"- {name}: " + " / ".join(f"{x:.2f}" for x in shares) for name, shares in coverage.items()]
        lines += [""]
    for name in summary["expert_load"]:
        lines += [f"![{name}](expert_load_{name}.png)", ""]
    return lines


def _missing(summary: dict, model: dict) -> list[str]:
    """Retrieval with one modality absent (eval.missing_modalities); nothing when not evaluated."""
    missing = summary.get("missing_modality")
    if not missing:
        return []
    head = ("the cross-modal gate renormalises over the others" if model.get("fusion", "flat") != "flat"
            else "the head averages over the others")
    lines = ["## Missing modalities", "", "Evaluated with one modality absent (its stem left out; with "
             f"per-modality streams its map is not routed and {head}):", "",
             "| modalities | mAP | Rank-1 |", "|---|---|---|",
             f"| all ({', '.join(summary['config']['eval']['modalities'])}) | {_pct(summary['map'])} | "
             f"{_pct(summary['rank1'])} |"]
    lines += [f"| {k.replace('_', ' ')} | {_pct(v['map'])} | {_pct(v['rank1'])} |" for k, v in missing.items()]
    return lines + [""]


def _fusion(summary: dict, scales) -> list[str]:
    fw = summary.get("fusion_weight_mean") or []
    return ["## Multi-scale fusion", "",
            "Mean gate weight per scale (last interval): " + ", ".join(f"{s}x{s}: {w:.2f}" for s, w in zip(scales, fw)),
            "", "![fusion weights](fusion_weights.png)", ""]


def _data(summary: dict) -> list[str]:
    d = summary["data"]
    lines = ["## Data", "", "| split | images | identities | cameras |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['images']} | {v['identities']} | {v['cameras']} |" for k, v in d.items()]
    return lines + ["", "Full figures: `summary.json`; configuration: `config.yaml`.", ""]

"""The report's per-modality section: what a thesis on a multi-spectral MoE shows.

  * modality-group load: with hierarchical blocks, the share of routed patches each coarse
    group (rgb / nir / tir with coarse_mode=given) received, per block (bars);
  * the hierarchical head (model.fusion=hierarchical): per modality, the fine gate's weight of
    each scale per query sample (one heatmap per modality), and the cross-modal gate's weight of
    each modality per sample.
Reads summary.json's dict (its ``config`` and ``expert_load``) and the query set's fusion weights.
"""

from __future__ import annotations

import numpy as np

from common.plots import pyplot, run_plot, save_figure
from moe.hierarchical import expert_id_table
from reid.data import MODALITIES


def expert_groups(sizes: list[int], placement: str) -> list[int]:
    """The coarse group of every global expert id of a hierarchical layer (ids: moe/hierarchical.py)."""
    owner = [0] * sum(sizes)
    for g, ids in enumerate(expert_id_table(tuple(sizes), placement)):
        for i in ids:
            owner[i] = g
    return owner


def group_shares(summary: dict) -> dict[str, list[float]] | None:
    """Per hierarchical block, the share of routed patches of each coarse group (whole run); None
    when the blocks are not hierarchical."""
    model = summary["config"]["model"]
    if model.get("moe_kind") != "hierarchical":
        return None
    h = model["hierarchical"]
    g = h.get("num_groups", 3)
    per = h.get("experts_per_group", 3)
    sizes = list(per) if isinstance(per, (list, tuple)) else [per] * g
    owner = np.asarray(expert_groups(sizes, h.get("placement", "grouped")))
    out = {}
    for name, v in summary["expert_load"].items():
        load = np.asarray(v["whole_run"], dtype=float)
        if load.size != owner.size:
            continue
        total = max(load.sum(), 1.0)
        out[name] = [float(load[owner == i].sum() / total) for i in range(g)]
    return out


def _group_names(n: int, summary: dict) -> list[str]:
    given = summary["config"]["model"]["hierarchical"].get("coarse_mode") == "given"
    return list(MODALITIES) if given and n == len(MODALITIES) else [f"group {i}" for i in range(n)]


@run_plot
def plot_group_load(shares: dict[str, list[float]], names: list[str], path: str) -> None:
    plt = pyplot()
    blocks = list(shares)
    fig, ax = plt.subplots(figsize=(2.2 + 1.4 * len(blocks), 3.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(np.arange(len(blocks)) + (i - (len(names) - 1) / 2) * width, [shares[b][i] for b in blocks],
               width, label=name)
    ax.axhline(1 / len(names), color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(blocks)), blocks)
    ax.set_ylabel("share of routed patches")
    ax.set_title("modality-group load (dashed: even)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def split_weights(weights_NX: np.ndarray, scales) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchical head weights [N, M*S] (modality x scale) -> modality weights [N, M] and the
    scale weights within each modality [N, M, S] (NaN where a modality was absent)."""
    w = np.asarray(weights_NX, dtype=float).reshape(len(weights_NX), -1, len(scales))
    modality = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        within = w / modality[..., None]
    return modality, within


@run_plot
def plot_modal_fusion(weights_NX: np.ndarray, scales, path: str, max_samples: int = 40) -> None:
    """One heatmap per modality (its fine gate's scale weights per sample) and one of the
    cross-modal gate's modality weights."""
    plt = pyplot()
    modality, within = split_weights(weights_NX[:max_samples], scales)
    m = modality.shape[1]
    fig, axes = plt.subplots(m + 1, 1, figsize=(10, 1.1 * (m + 1) * 1.4 + 0.8), sharex=True)
    names = list(MODALITIES)[:m]
    for i, ax in enumerate(axes[:m]):
        im = ax.imshow(within[:, i].T, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(scales)), [f"{s}x{s}" for s in scales])
        ax.set_title(f"{names[i]}: fine gate, weight of each scale", fontsize=9)
    im = axes[m].imshow(modality.T, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axes[m].set_yticks(range(m), names)
    axes[m].set_title("cross-modal coarse gate: weight of each modality", fontsize=9)
    axes[m].set_xlabel("query sample")
    fig.colorbar(im, ax=list(axes), label="weight", shrink=0.8)
    save_figure(fig, path, bbox_inches="tight")


def modal_section(summary: dict, run_dir: str, fusion_weights: np.ndarray | None, out) -> list[str]:
    """The report's "Modalities" section (and its plots, through ``out(name) -> path``); [] when
    neither the blocks nor the head are hierarchical."""
    lines: list[str] = []
    shares = group_shares(summary)
    if shares:
        names = _group_names(len(next(iter(shares.values()))), summary)
        plot_group_load(shares, names, out("group_load.png"))
        lines += ["## Modalities", "", "Share of routed patches per coarse group (whole run):", "",
                  "| block | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {b} | " + " | ".join(f"{x:.2f}" for x in v) + " |" for b, v in shares.items()]
        lines += ["", "![group load](group_load.png)", ""]
    model = summary["config"]["model"]
    if model.get("fusion") == "hierarchical" and fusion_weights is not None:
        scales = model.get("multiscale", {}).get("scales", [4, 8, 16])
        scales = model.get("hierarchical_fusion", {}).get("scales", scales)
        plot_modal_fusion(fusion_weights, scales, out("modal_fusion.png"))
        modality, within = split_weights(fusion_weights, scales)
        if not lines:
            lines += ["## Modalities", ""]
        lines += ["Hierarchical head, query set: mean weight of each modality (cross-modal gate) and of each "
                  "scale within it (its fine gate):", "",
                  "| modality | modality weight | " + " | ".join(f"{s}x{s}" for s in scales) + " |",
                  "|---|---" + "|---" * len(scales) + "|"]
        for i, name in enumerate(list(MODALITIES)[:modality.shape[1]]):
            lines.append(f"| {name} | {np.nanmean(modality[:, i]):.2f} | "
                         + " | ".join(f"{np.nanmean(within[:, i, j]):.2f}" for j in range(len(scales))) + " |")
        lines += ["", "![modal fusion](modal_fusion.png)", ""]
    return lines

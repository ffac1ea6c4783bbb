"""The scaling report's modelled sections (written by scaling/report.py): the projection onto
node presets, the layout decision per node count, and the held-out validation of the fitted model.
Every number here is labelled MODEL except the measured columns of the validation table."""

from __future__ import annotations

import os

from common.plots import pyplot
from scaling.projection import (LAYOUTS, PROJECT_GPUS, StepCost, decide, layout_name, pct_error, project, validate)


def _bw(gbps: float) -> str:
    return "free" if gbps == float("inf") else f"{gbps:,.1f} Gb/s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def plot_decision(decisions: dict, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {layout_name(*lay): s for lay, s in zip(LAYOUTS, ("-", "--", ":"))}
    for i, (name, rows) in enumerate(decisions.items()):
        color = f"C{i}"
        for lay, ls in styles.items():
            pts = [(r["nodes"], 100 * r["efficiency"][lay]) for r in rows if lay in r["efficiency"]]
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker="o", ms=3, color=color, label=f"{name}: {lay}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 105)
    ax.set_xlabel("nodes")
    ax.set_ylabel("projected weak-scaling efficiency (%)")
    ax.set_title("MODEL: layout per node count (not measured)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def projection_section(cost: StepCost, presets: list, out_dir: str) -> list[str]:
    """Presets side by side (flat, EP = all GPUs), then the layout decision table + plot."""
    L = ["## Projection to many GPUs — a MODEL, not a measurement", "",
         "Every number in this section is modelled (scaling/comm_model.py, scaling/projection.py; assumptions in "
         "docs/PROJECTION.md). Weak scaling: per-rank batch and experts per rank as measured, EP = all GPUs, "
         "a two-level all-to-all (inside a node / between nodes) on each preset's links.", "",
         f"- compute per rank and step: **{1e3 * cost.compute_s:.1f} ms** from {cost.source}; "
         f"{cost.samples_per_rank:g} samples per rank",
         f"- all-to-all per step: {cost.calls:g} payload calls of {cost.bytes_per_call / 2**20:.3f} MiB per rank "
         f"(from the reference point); node-local placement sends each coarse slot once across nodes instead of "
         f"once per fine slot (Kf = {cost.fine_slots})"]
    L += [f"- caveat: {c}" for c in cost.caveats]
    if cost.compute_s and "cpu" in cost.source:
        L.append("- the compute is this machine's CPU: on a GPU it is far shorter and the network weighs more; "
                 "project with `--compute-from <a GPU run's summary.json>`")
    L += ["", "| preset | GPUs/node | inside a node | between nodes | source |", "|---|---|---|---|---|"]
    for p in presets:
        label = f"**{p.name}** (this machine's loopback, fitted)" if p.measured else p.name
        L.append(f"| {label} | {'one level' if p.measured else p.gpus_per_node} | {p.intra.latency_us:.1f} us/peer, {_bw(p.intra.bandwidth_gbps)} | "
                 f"{p.inter.latency_us:.1f} us/peer, {_bw(p.inter.bandwidth_gbps)} | {p.source} |")
    projs = {("measured (loopback)" if p.measured else p.name): project(cost, p) for p in presets}
    L += ["", "Flat placement, EP = all GPUs (MODEL): all-to-all ms per step, samples/s, efficiency = compute / step.",
          "", "| GPUs | " + " | ".join(f"{n}: a2a ms | {n}: samples/s | {n}: efficiency" for n in projs) + " |",
          "|---|" + "---|---|---|" * len(projs)]
    for i, g in enumerate(PROJECT_GPUS):
        cells = [f"{rows[i]['a2a_ms']:.2f} | {rows[i]['samples_per_s']:,.0f} | {rows[i]['efficiency']:.1%}"
                 for rows in projs.values()]
        L.append(f"| {g} | " + " | ".join(cells) + " |")

    decisions, changes = {}, []
    two_level = [p for p in presets if not p.measured]
    if not two_level:
        return L + ["", "No layout table: it needs a two-level preset (`--preset h100-ndr,...`); the measured one "
                    "is one flat loopback network.", ""]
    for p in two_level:
        rows, ch = decide(cost, p)
        decisions[p.name] = rows
        changes += ch
    plot_decision(decisions, os.path.join(out_dir, "layout_model.png"))
    lays = [layout_name(*lay) for lay in LAYOUTS]
    L += ["", "### Layout per node count (MODEL): flat vs node-local placement, EP = GPUs vs EP = GPUs/node", "",
          "Projected efficiency of each layout for the same model (E = experts per rank x GPUs). EP = GPUs/node "
          "keeps the all-to-all inside a node but holds (nodes) times more experts per rank and all-reduces their "
          "fp32 gradients across nodes (ring, not overlapped). Node-local is the two-stage transport "
          "(parallel/node_transport.py): for models whose experts are grouped per node (HierarchicalMoE).", "",
          "| preset | nodes | GPUs | " + " | ".join(lays) + " | best |", "|---|---|---|" + "---|" * (len(lays) + 1)]
    for name, rows in decisions.items():
        for r in rows:
            L.append(f"| {name} | {r['nodes']} | {r['gpus']} | "
                     + " | ".join(f"{r['efficiency'][k]:.1%}" if k in r["efficiency"] else "-" for k in lays)
                     + f" | {r['best']} |")
    if cost.expert_params_per_rank is None:
        L += ["", "EP = GPUs/node beyond one node is left out: the points do not record the expert parameters."]
    L += ["", "Break-even points (MODEL):", ""] + [f"- {c}" for c in changes] + ["", "![layout](layout_model.png)", ""]
    return L


def validation_section(recs: list[dict], fit_max_world: int | None) -> list[str]:
    """Fit on the small points, predict the large ones, print the error of each held-out point."""
    v = validate(recs, fit_max_world)
    L = ["## Validation: the fitted model against points it was not fitted on", "",
         f"Fitted on the points with at most {v['fit_max_world']} rank(s) (`--fit-max-world`): "
         f"{', '.join(f'`{p}`' for p in v['fit_on']) or 'none'} (all-to-all), and the EP=1 points "
         f"{', '.join(f'`{p}`' for p in v['twins_in_fit']) or 'none'} (their stage times subtracted from their EP>=2 "
         "twins'). Predicted: every point with more ranks and EP >= 2; none of them entered the fit.", ""]
    if v["model"] is None:
        return L + [f"No validation: {v['why_not']}. Measure one with `msmoe scale --validation` "
                    "(world 1,2,4 x EP 1,2,4), then `msmoe report --points runs/validation/points.jsonl`.", ""]
    ab = v["model"]
    L += [f"Model fitted: alpha = {ab.alpha_s * 1e6:.1f} us per peer, bandwidth "
          f"{_bw(8 / ab.beta_s_per_byte / 1e9 if ab.beta_s_per_byte else float('inf'))} ({ab.note}; "
          f"{ab.fitted_on} point(s)).",
          "All-to-all: forward dispatch + combine minus the EP=1 twin's (as fitted). Step: the EP=1 twin's measured "
          "step (same ranks, no all-to-all: the compute) plus the modelled all-to-alls of the step (forward and "
          "backward).", "",
          "| held-out point | a2a predicted ms | a2a measured ms | a2a error | step predicted ms | step measured ms | "
          "step error | compute from |", "|---|---|---|---|---|---|---|---|"]
    for r in v["rows"]:
        L.append(f"| {r['point']} | {_ms(r['a2a_pred_ms'])} | {_ms(r['a2a_meas_ms'])} | "
                 f"{_pct(pct_error(r['a2a_pred_ms'], r['a2a_meas_ms']))} | {_ms(r['step_pred_ms'])} | "
                 f"{_ms(r['step_meas_ms'])} | {_pct(pct_error(r['step_pred_ms'], r['step_meas_ms']))} | "
                 f"{r['twin'] or '-'} |")
    return L + [""]


def validation_summary(recs: list[dict], fit_max_world: int | None) -> list[str]:
    """The held-out errors as plain lines (what ``msmoe report`` prints)."""
    v = validate(recs, fit_max_world)
    if v["model"] is None:
        return [f"validation: none ({v['why_not']}; see msmoe scale --validation)"]
    out = [f"validation: model fitted on {', '.join(v['fit_on'])} (<= {v['fit_max_world']} ranks); held out:"]
    for r in v["rows"]:
        out.append(f"  {r['point']:14s} all-to-all {_ms(r['a2a_pred_ms'])} ms predicted, {_ms(r['a2a_meas_ms'])} "
                   f"measured ({_pct(pct_error(r['a2a_pred_ms'], r['a2a_meas_ms']))}); step {_ms(r['step_pred_ms'])} "
                   f"vs {_ms(r['step_meas_ms'])} ms ({_pct(pct_error(r['step_pred_ms'], r['step_meas_ms']))})")
    return out

"""The scaling report's projection and its check: per-rank compute from a measurement, the two-level
all-to-all model of scaling/comm_model.py on named node presets, the layout decision (flat vs
node-local placement, EP size) per node count, and the held-out validation of the fitted model.

Everything here is modelled except what it starts from: the compute per rank (a measured point, or
a training run on the target device: ``msmoe report --compute-from runs/<name>/summary.json``) and,
for the validation, the measured points themselves.

Weak scaling throughout: the per-rank batch and the experts per rank at EP = all ranks stay as
measured, so the model grows with the GPUs (E = experts per rank x GPUs). A step is
  compute + calls x all-to-all(placement, EP, bytes per call)  [+ expert-gradient all-reduce if EP < GPUs]
where calls are the payload all-to-alls per step (forward and backward) as counted on the
reference point, plus the dense parameters' gradient all-reduce over all ranks (ring, on the
inter-node link once the ranks span nodes; the same for every layout). Not modelled: overlap of
communication with compute, routing imbalance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from scaling.comm_model import MEASURED, PRESETS, NodePreset, a2a_s, allreduce_s, measured_preset
from scaling.points import AlphaBeta, fit_alpha_beta, point_label

NODE_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)
PROJECT_GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)
ELEMENT_BYTES = {"fp32": 4, "bf16": 2}  # payload rows of the all-to-all
GRAD_BYTES = 4  # fp32 gradient reduction (DESIGN: bf16 compute, fp32 accumulation)


@dataclass(frozen=True)
class StepCost:
    """What one rank does per step, from a measurement."""

    compute_s: float  # per step, without the expert all-to-all
    samples_per_rank: float  # per step
    bytes_per_call: float  # handed to one flat all-to-all by one rank
    calls: float  # payload all-to-alls per step (forward + backward)
    expert_params_per_rank: float | None  # at EP = all ranks; None: not recorded
    fine_slots: int  # Kf: fine experts per coarse slot (the two-stage transport's saving)
    source: str
    caveats: tuple = ()
    dense_params: float | None = None  # the dense parameters (their gradient all-reduce); None: not recorded


def reference_point(recs: list[dict]) -> dict:
    """The largest EP point (its bytes and calls per step are the projection's)."""
    cands = [r for r in recs if r["ep_size"] >= 2 and (r["a2a_bytes_per_step"].get("calls") or 0)]
    if not cands:
        raise ValueError("no measured point with EP >= 2 and all-to-all calls: run `msmoe scale` with --ep 2 or more")
    return max(cands, key=lambda r: (r["world_size"], r["ep_size"], r["samples_per_s"]))


def cost_from_points(recs: list[dict], measured: NodePreset, fine_slots: int | None = None) -> StepCost:
    """Compute = the reference point's step minus its modelled (fitted, loopback) all-to-all time."""
    ref = reference_point(recs)
    a2a = ref["a2a_bytes_per_step"]
    calls = float(a2a["calls"])
    per_call = a2a["total"] / calls
    modelled = calls * a2a_s(measured, "flat", ref["ep_size"], per_call)
    compute_s = max(ref["step_time_ms"]["step"] / 1e3 - modelled, 1e-9)
    params = ref.get("expert_params")
    kf = fine_slots or ref.get("top_k") or 1
    per_rank = ref.get("per_rank_batch") or ref["global_batch"] / ref["world_size"]  # samples per rank and step
    return StepCost(compute_s, per_rank, per_call, calls,
                    params / ref["ep_size"] if params else None, int(kf),
                    f"measured point `{point_label(ref)}` ({ref['device']}), its step minus the fitted all-to-all",
                    dense_params=ref.get("dense_params"))


def cost_from_run(path: str, points_cost: StepCost, ref: dict) -> StepCost:
    """Compute from a training run on the target device (``summary.json`` of ``msmoe train``, EP = 1:
    its step has no all-to-all in it); bytes per call scaled from the points by samples per rank."""
    with open(path) as fh:
        s = json.load(fh)
    need = ("step_time_ms", "world_size", "ep_size", "config", "device")
    missing = [k for k in need if k not in s]
    if missing:
        raise ValueError(f"--compute-from {path}: not a msmoe train summary.json (no {', '.join(missing)})")
    if s["ep_size"] != 1:
        raise ValueError(f"--compute-from {path}: ep_size={s['ep_size']}; give an EP=1 run (its step time has no "
                         "all-to-all in it), e.g. msmoe train ... train.ep_size=1 on one GPU")
    train = s["config"]["train"]
    samples = train["p"] * train["k"] / s["world_size"]
    caveats = []
    theirs, ours = s["config"].get("model"), ref.get("model_config")
    if ours is not None and theirs != ours:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        caveats.append(f"the compute run's model differs from the swept one in {', '.join(diff)}: "
                       "the all-to-all bytes are the swept model's")
    prec_theirs, prec_ours = train.get("precision", "fp32"), ref.get("precision") or "fp32"
    scale = ELEMENT_BYTES[prec_theirs] / ELEMENT_BYTES[prec_ours]
    if scale != 1:
        caveats.append(f"the compute run trains in {prec_theirs}, the points in {prec_ours}: bytes scaled by {scale:g}")
    return StepCost(s["step_time_ms"]["step"] / 1e3, samples,
                    points_cost.bytes_per_call * samples / points_cost.samples_per_rank * scale, points_cost.calls,
                    points_cost.expert_params_per_rank, points_cost.fine_slots,
                    f"`{path}` ({s['device']}, {s['world_size']} rank(s), EP 1): its step time", tuple(caveats),
                    points_cost.dense_params)


def step_s(cost: StepCost, preset: NodePreset, gpus: int, ep: int, placement: str) -> tuple[float, float, float]:
    """(step, all-to-all, expert all-reduce) seconds at ``gpus`` ranks with EP = ``ep``."""
    t_a2a = cost.calls * a2a_s(preset, placement, ep, cost.bytes_per_call, cost.fine_slots)
    t_ar = 0.0
    replicas = gpus // ep
    if replicas > 1 and cost.expert_params_per_rank:
        # the same model as EP = gpus: E = experts per rank x gpus, so a rank holds gpus / ep times more
        grad_bytes = cost.expert_params_per_rank * replicas * GRAD_BYTES
        link = preset.inter if ep >= preset.gpus_per_node else preset.intra
        t_ar = allreduce_s(link, replicas, grad_bytes)
    t_ar += dense_allreduce_s(cost, preset, gpus)
    return cost.compute_s + t_a2a + t_ar, t_a2a, t_ar


def dense_allreduce_s(cost: StepCost, preset: NodePreset, gpus: int) -> float:
    """The dense parameters' fp32 gradient ring all-reduce over all ``gpus`` (the same for every layout):
    on the inter-node link once the ranks span nodes (a ring's slowest edge sets its pace)."""
    if not cost.dense_params or gpus <= 1:
        return 0.0
    link = preset.inter if gpus > preset.gpus_per_node else preset.intra
    return allreduce_s(link, gpus, cost.dense_params * GRAD_BYTES)


def project(cost: StepCost, preset: NodePreset, gpus=PROJECT_GPUS, placement: str = "flat") -> list[dict]:
    """Weak scaling, EP = all GPUs (nodes filled: ``gpus`` are multiples of the node size or inside one)."""
    out = []
    for g in gpus:
        step, t_a2a, _ = step_s(cost, preset, g, g, placement)
        out.append({"gpus": g, "nodes": max(g // preset.gpus_per_node, 1), "step_ms": 1e3 * step,
                    "a2a_ms": 1e3 * t_a2a, "samples_per_s": g * cost.samples_per_rank / step,
                    "efficiency": cost.compute_s / step})
    return out


LAYOUTS = (("flat", "all"), ("node-local", "all"), ("flat", "node"))


def layout_name(placement: str, ep: str) -> str:
    return f"{placement}, EP={'GPUs' if ep == 'all' else 'GPUs/node'}"


def decide(cost: StepCost, preset: NodePreset, nodes=NODE_COUNTS) -> tuple[list[dict], list[str]]:
    """Per node count the efficiency of each layout and the best one; and the break-even points:
    where node-local overtakes flat placement, and EP = GPUs/node overtakes EP = GPUs (or back)."""
    rows = []
    for m in nodes:
        g = m * preset.gpus_per_node
        eff = {}
        for placement, ep in LAYOUTS:
            if ep == "node" and cost.expert_params_per_rank is None and m > 1:
                continue  # its all-reduce cannot be sized
            e = g if ep == "all" else min(preset.gpus_per_node, g)
            eff[layout_name(placement, ep)] = cost.compute_s / step_s(cost, preset, g, e, placement)[0]
        best = max(eff, key=lambda k: (round(eff[k], 6), k == layout_name("flat", "all")))
        rows.append({"nodes": m, "gpus": g, "efficiency": eff, "best": best})
    flat = layout_name("flat", "all")
    notes = [break_even(preset.name, rows, flat, layout_name("node-local", "all")),
             break_even(preset.name, rows, flat, layout_name("flat", "node"))]
    return rows, [n for n in notes if n]


def break_even(name: str, rows: list[dict], a: str, b: str) -> str | None:
    """Where layout ``b`` starts (or stops) beating ``a`` over the node counts of ``rows``."""
    pts = [(r["nodes"], r["efficiency"][b] - r["efficiency"][a]) for r in rows
           if a in r["efficiency"] and b in r["efficiency"] and r["nodes"] > 1]
    if not pts:
        return None
    flips, prev = [], None
    for m, d in pts:
        wins = d > 1e-9
        if prev is not None and wins != prev:
            flips.append(f"{'beats' if wins else 'falls behind'} from {m} nodes")
        prev = wins
    first_m, first_d = pts[0]
    start = f"{b} {'beats' if first_d > 1e-9 else 'does not beat'} {a} at {first_m} nodes"
    return f"{name}: {start}" + (", then " + ", then ".join(flips) if flips else
                                 f" and up to {pts[-1][0]} nodes")


# ------------------------------------------------------------------ validation
def a2a_stage_s(r: dict, twins: dict) -> float | None:
    """Measured forward all-to-all time of a point: dispatch + combine minus its EP=1 twin's."""
    twin = twins.get((r["mode"], r["world_size"], r["num_experts"]))
    if twin is None:
        return None
    ms, tm = r["step_time_ms"], twin["step_time_ms"]
    return (ms.get("dispatch", 0.0) + ms.get("combine", 0.0) - tm.get("dispatch", 0.0) - tm.get("combine", 0.0)) / 1e3


def validate(recs: list[dict], fit_max_world: int | None = None) -> dict:
    """Fit on the points of at most ``fit_max_world`` ranks (default: all but the largest world size),
    predict the all-to-all and step time of the others with EP >= 2."""
    worlds = sorted({r["world_size"] for r in recs})
    limit = fit_max_world if fit_max_world is not None else (worlds[-2] if len(worlds) > 1 else worlds[-1])
    fit_set = [r for r in recs if r["world_size"] <= limit]
    held = [r for r in recs if r["world_size"] > limit and r["ep_size"] >= 2]
    fitted = {(r["mode"], r["world_size"], r["num_experts"]) for r in fit_set if r["ep_size"] >= 2}
    out = {"fit_max_world": limit, "fit_on": [point_label(r) for r in fit_set if r["ep_size"] >= 2],
           "twins_in_fit": [point_label(r) for r in fit_set if r["ep_size"] == 1
                            and (r["mode"], r["world_size"], r["num_experts"]) in fitted], "rows": [], "model": None}
    ab = fit_alpha_beta(fit_set)
    if ab is None or not held:
        out["why_not"] = ("no point with EP >= 2 and at most {} ranks to fit on".format(limit) if ab is None else
                          f"no point with EP >= 2 and more than {limit} ranks to predict")
        return out
    out["model"] = ab
    twins = {(r["mode"], r["world_size"], r["num_experts"]): r for r in recs if r["ep_size"] == 1}
    for r in held:
        a2a = r["a2a_bytes_per_step"]
        calls = a2a.get("calls") or 0
        fwd_calls = calls / 2
        pred_fwd = fwd_calls * ab.a2a_s(r["ep_size"], a2a["forward"] / max(fwd_calls, 1))
        meas_fwd = a2a_stage_s(r, twins)
        twin = twins.get((r["mode"], r["world_size"], r["num_experts"]))
        pred_step = None
        if twin is not None:
            pred_step = twin["step_time_ms"]["step"] / 1e3 + calls * ab.a2a_s(r["ep_size"], a2a["total"] / max(calls, 1))
        out["rows"].append({"point": point_label(r), "twin": point_label(twin) if twin else None,
                            "a2a_pred_ms": 1e3 * pred_fwd, "a2a_meas_ms": None if meas_fwd is None else 1e3 * meas_fwd,
                            "step_pred_ms": None if pred_step is None else 1e3 * pred_step,
                            "step_meas_ms": r["step_time_ms"]["step"]})
    return out


def pct_error(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas <= 0:
        return None
    return (pred - meas) / meas


def presets_for(names: list[str], ab: AlphaBeta | None) -> list[NodePreset]:
    out = []
    for n in names:
        if n == MEASURED:
            if ab is not None:
                out.append(measured_preset(ab.alpha_s, ab.beta_s_per_byte))
        else:
            out.append(PRESETS[n])
    return out


DEFAULT_PRESETS = (MEASURED, "h100-ndr", "a100-hdr", "eth-100g")


@dataclass(frozen=True)
class ProjectionSpec:
    """``msmoe report``'s projection options."""

    presets: tuple = DEFAULT_PRESETS  # names in scaling.comm_model.PRESETS, or "measured"
    compute_from: str | None = None  # a msmoe train summary.json (EP = 1) on the target device
    fit_max_world: int | None = None  # validation: fit on points with at most this many ranks
    fine_slots: int | None = None  # Kf for node-local placement (default: the points' top-k)
    nodes: tuple = ()  # NodePresets of the user's own (--node), shown after the named ones


def projection_inputs(recs: list[dict], spec: ProjectionSpec) -> tuple[StepCost | None, list[NodePreset], str]:
    """(step cost, presets, why there is no projection)."""
    ab = fit_alpha_beta(recs)
    if ab is None:
        return None, [], ("No measured point has EP >= 2 with all-to-all traffic, so there is nothing to fit the "
                          "network model on: run `msmoe scale` with --ep 2 or more.")
    measured = measured_preset(ab.alpha_s, ab.beta_s_per_byte)
    cost = cost_from_points(recs, measured, spec.fine_slots)
    if spec.compute_from:
        cost = cost_from_run(spec.compute_from, cost, reference_point(recs))
    return cost, presets_for(list(spec.presets), ab) + list(spec.nodes), ""

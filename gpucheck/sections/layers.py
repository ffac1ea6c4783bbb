"""gpu-check section "layers": every MoE layer on the device against the loop reference in float64.

  python3 -m gpucheck.sections.layers --json runs/gpu-check/layers.json               # on the GPU
  python -m gpucheck.sections.layers --json /tmp/l.json --device cpu --quick           # dry run on CPU

Cases: PatchMoE (expert kinds seed / ffn / conv x impls auto / bmm / grouped_mm, and fused for
ffn), token routing (PatchMoE with patch_size 1), HierarchicalMoE (learned and given coarse
routing) and MultiScaleMoE (the thesis's soft fusion of 4/8/16 windows). Each runs on the device in fp32 and bf16 and is
compared with tests/reference.py's loop formulation in float64 on CPU: the output, the input's
gradient and every parameter's gradient, as ||ours - ref|| / ||ref||, against ``BOUND[dtype]``
(router parameters: ``ROUTER_BOUND[dtype]``, each over the norm of its whole router's reference
gradient: a gate bias's gradient is a sum over units that can cancel to ~1e-3 of its weights', and
over its own norm that would read as a large error where the rounding is as small as elsewhere).

The reference and the device layer see the same numbers: weights, input and upstream gradient are
drawn on the bf16 grid (exact in fp32 and fp64), and the draw is repeated until every unit's k-th
and (k+1)-th routing scores differ by at least ``MARGIN`` (bf16 rounding of the pooled input must
not flip a routing decision; a flip is a different function, not a numerical error).

It also counts the calls of ``common.compat.grouped_mm``: with ``expert.impl=auto`` a bf16 layer on
sm90+ must take it.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field

import torch

from common import compat
from gpucheck import section
from moe.config import ExpertConfig, HierarchicalMoEConfig, MultiScaleMoEConfig, PatchMoEConfig, RouterConfig
from moe.hierarchical import HierarchicalMoE
from moe.multiscale import MultiScaleMoE
from moe.patch_moe import PatchMoE

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests"))
import reference  # noqa: E402  tests/reference.py: the loop formulations the test suite checks against

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# ||ours - ref|| / ||ref|| per tensor. fp32: reduction order only (TF32 off). bf16: 8-bit mantissa
# inputs to every matmul and per-row gathers, over O(100) rows per expert.
BOUND = {"fp32": 1e-4, "bf16": 5e-2}
# Router (gate) gradients: each is a difference of the chosen experts' bf16 outputs projected on the
# upstream gradient, summed over few units; in bf16 they keep less relative accuracy (9e-2 seen on
# CPU for the hierarchical layer's fine router, 1e-5 in fp32).
ROUTER_BOUND = {"fp32": 1e-4, "bf16": 0.25}
# Least gap between the k-th and (k+1)-th routing score of any unit. A bf16 pooled input is off by
# about 2^-9 relative: logits by ~3e-4 (32 channels, |w| ~ 0.1, |pooled x| ~ 0.25), scores by ~1e-4.
MARGIN = 3e-3
MAX_DRAWS = 100


@dataclass(frozen=True)
class Case:
    name: str
    layer: str  # "patch" | "token" | "hier" | "multiscale"
    kind: str = "seed"
    impl: str = "auto"
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Sizes:
    batch: int
    side: int  # H = W
    dim: int  # C
    hidden: int  # F
    experts: int  # E
    patch: int  # P

    @staticmethod
    def of(quick: bool) -> "Sizes":
        # 2 x 8x8 maps: 8 patches of 4x4 (32 points for token routing), each routed to 2 of 4 experts.
        # Few units on purpose: every one must clear MARGIN (8 experts x 32 units almost never do).
        return Sizes(2, 8, 16, 32, 4, 4) if quick else Sizes(2, 8, 32, 64, 4, 4)


def cases() -> list[Case]:
    out = []
    for kind in ("seed", "ffn", "conv"):
        for impl in ("auto", "bmm", "grouped_mm") + (("fused",) if kind == "ffn" else ()):
            out.append(Case(f"PatchMoE {kind} {impl}", "patch", kind, impl))
    for kind in ("seed", "ffn"):
        out.append(Case(f"TokenMoE P=1 {kind} auto", "token", kind))
    out.append(Case("HierarchicalMoE learned seed", "hier", "seed", options={"coarse_mode": "learned"}))
    out.append(Case("HierarchicalMoE given ffn", "hier", "ffn", options={"coarse_mode": "given"}))
    out.append(Case("MultiScaleMoE seed", "multiscale"))
    return out


def build(case: Case, s: Sizes) -> torch.nn.Module:
    expert = ExpertConfig(kind=case.kind, hidden_dim=s.hidden, dropout=0.0, impl=case.impl)
    if case.layer in ("patch", "token"):
        return PatchMoE(PatchMoEConfig(dim=s.dim, router=RouterConfig(num_experts=s.experts, top_k=2), expert=expert,
                                       patch_size=s.patch if case.layer == "patch" else 1))
    if case.layer == "hier":  # coarse top-2: with top-1 the renormalised weight is 1 and its gradient 0
        return HierarchicalMoE(HierarchicalMoEConfig(
            dim=s.dim, patch_size=s.patch, num_groups=3, experts_per_group=2, coarse_mode=case.options["coarse_mode"],
            coarse=RouterConfig(num_experts=3, top_k=2), fine=RouterConfig(num_experts=2, top_k=2), expert=expert))
    return MultiScaleMoE(MultiScaleMoEConfig(dim=s.dim, hidden_dim=s.hidden, dropout=0.0))


def inputs(case: Case, s: Sizes, gen: torch.Generator) -> dict:
    """x (map, or the multi-scale fusion's per-scale feature list), upstream gradient, modality: on the bf16 grid."""
    def draw(*shape):
        return torch.randn(*shape, generator=gen).bfloat16().float()

    if case.layer == "multiscale":
        return {"x": [draw(4 * s.batch, s.dim) for _ in range(3)], "g": draw(4 * s.batch, s.dim), "modality": None}
    side = s.side // 2 if case.layer == "token" else s.side  # every point is a unit: keep the loop short
    x = draw(s.batch, side, side, s.dim)
    modality = torch.arange(s.batch) % 3 if case.options.get("coarse_mode") == "given" else None
    return {"x": x, "g": draw(*x.shape), "modality": modality}


def routing_margin(case: Case, layer: torch.nn.Module, x: torch.Tensor, patch: int) -> float:
    """Least gap between the k-th and (k+1)-th selection score over every unit and router."""
    if case.layer == "multiscale":
        return float("inf")
    b, h, w, c = x.shape
    p = 1 if case.layer == "token" else patch
    pooled = x.reshape(b, h // p, p, w // p, p, c).mean((2, 4)).reshape(-1, c)
    routers = [layer.router] if case.layer in ("patch", "token") else \
        ([layer.coarse] if layer.cfg.coarse_mode == "learned" else []) + list(layer.fine)
    gap = float("inf")
    with torch.no_grad():
        for r in routers:
            k, e = r.cfg.max_k, r.cfg.num_experts
            if k >= e:
                continue
            sel = r(pooled).probs + r.selection_bias.float()
            top = sel.sort(-1, descending=True).values
            gap = min(gap, float((top[:, k - 1] - top[:, k]).min()))
    return gap


def on_bf16_grid(layer: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(p.bfloat16().float())


def prepare(case: Case, s: Sizes, seed: int) -> tuple[torch.nn.Module, dict, int]:
    """A layer and inputs whose routing no rounding can flip (see MARGIN)."""
    for draw in range(MAX_DRAWS):
        torch.manual_seed(seed + draw)
        layer = build(case, s)
        on_bf16_grid(layer)
        gen = torch.Generator().manual_seed(seed + draw)
        data = inputs(case, s, gen)
        if routing_margin(case, layer, data["x"], s.patch) >= MARGIN:
            return layer, data, draw
    raise RuntimeError(f"{case.name}: no draw of {MAX_DRAWS} had routing margins >= {MARGIN}")


def reference_grads(case: Case, layer: torch.nn.Module, data: dict) -> dict[str, torch.Tensor]:
    """tests/reference.py's loops in float64 on CPU: output and every gradient, by our names."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the reference's own modules are built in float64
    try:
        ref = copy.deepcopy(layer).double()
        g = data["g"].double()
        out: dict[str, torch.Tensor] = {}
        if case.layer == "multiscale":
            feats = [f.double().requires_grad_() for f in data["x"]]
            seed_model, mods = reference.multiscale_to_seed(ref)
            y, _ = seed_model(feats)
            (y * g).sum().backward()
            out["x"] = torch.cat([f.grad for f in feats])
            out.update({f"gate.{n}": t for n, t in reference.seed_gate_grads(seed_model.gating_network).items()})
            out.update({f"experts.{n}": t for n, t in reference.seed_modules_grads(mods).items()})
        else:
            x = data["x"].double().requires_grad_()
            mods = reference.experts_to_modules(case.kind, ref.experts)
            if case.layer == "hier":
                y = reference.hierarchical_reference(ref, x, mods, data["modality"])
            else:
                y = reference.patch_moe_reference(ref, x, mods)[0]
            (y * g).sum().backward()
            out["x"] = x.grad
            out.update({f"experts.{n}": t for n, t in reference.modules_grads(case.kind, mods).items()})
            out.update({n: p.grad for n, p in ref.named_parameters() if not n.startswith("experts.")})
        out["out"] = y.detach()
        return out
    finally:
        torch.set_default_dtype(previous)


def device_grads(case: Case, layer: torch.nn.Module, data: dict, device: torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    mine = copy.deepcopy(layer).to(device, dtype)
    g = data["g"].to(device, dtype)
    if case.layer == "multiscale":
        feats = [f.to(device, dtype, copy=True).requires_grad_() for f in data["x"]]
        res = mine.fuse(feats)
    else:
        x = data["x"].to(device, dtype, copy=True).requires_grad_()
        res = mine(x, data["modality"].to(device)) if case.layer == "hier" and data["modality"] is not None \
            else mine(x)
    (res.out * g).sum().backward()
    out = {"out": res.out.detach(), "x": torch.cat([f.grad for f in feats]) if case.layer == "multiscale" else x.grad}
    out.update({n: p.grad for n, p in mine.named_parameters()})
    return out


def _router_of(name: str) -> str:
    """``fine.2.gate.biases.0`` -> ``fine.2``: the router a gate parameter belongs to."""
    head, _, _ = name.partition(".gate.")
    return head


def router_errors(mine: dict, ref: dict) -> dict[str, float]:
    """||ours - ref|| of each router parameter over the norm of its whole router's reference gradient."""
    names = [n for n in ref if n not in ("out", "x") and not n.startswith("experts.")]
    scale: dict[str, float] = {}
    for n in names:
        if ref[n] is not None:
            scale[_router_of(n)] = scale.get(_router_of(n), 0.0) + float(ref[n].detach().double().square().sum())
    out = {}
    for n in names:
        a, b = mine.get(n), ref[n]
        if a is None and b is None:  # the parameter took no part on either side
            out[n] = 0.0
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        diff = float(torch.linalg.vector_norm(a.detach().double().cpu() - b.detach().double().cpu()))
        total = scale.get(_router_of(n), 0.0) ** 0.5
        out[n] = diff / total if total > 0 else (0.0 if diff == 0 else float("inf"))
    return out


class GroupedMMCounter:
    """Counts calls of common.compat.grouped_mm (the only way into torch._grouped_mm)."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = compat.grouped_mm

    def __enter__(self) -> "GroupedMMCounter":
        def counted(*args):
            self.calls += 1
            return self._real(*args)
        compat.grouped_mm = counted
        return self

    def __exit__(self, *exc) -> None:
        compat.grouped_mm = self._real


def check(args) -> tuple[bool, str, dict, list]:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    s = Sizes.of(args.quick)
    rows, worst = [], {d: {"out": 0.0, "x_grad": 0.0, "param_grad": 0.0, "router_grad": 0.0} for d in DTYPES}
    auto_bf16_calls = None
    for i, case in enumerate(cases()):
        layer, data, draws = prepare(case, s, seed=1000 * i)
        ref = reference_grads(case, layer, data)
        for dname, dtype in DTYPES.items():
            row = {"case": case.name, "dtype": dname, "redraws": draws}
            if case.impl == "grouped_mm" and not compat.grouped_mm_available(device, dtype):
                rows.append({**row, "status": "n/a", "why": f"torch._grouped_mm does not run {dname} on {device} here"})
                continue
            try:
                with GroupedMMCounter() as counter:
                    mine = device_grads(case, layer, data, device, dtype)
            except Exception as exc:  # noqa: BLE001 - one case's failure is its row
                rows.append({**row, "status": "FAIL", "why": f"{type(exc).__name__}: {str(exc)[:300]}"})
                continue
            params = {n: section.relative_error(mine.get(n), r) for n, r in ref.items() if n not in ("out", "x")}
            missing = sorted(set(mine) - set(ref) - {"out", "x"})
            experts = {n: e for n, e in params.items() if n.startswith("experts.")}
            router = router_errors(mine, ref)
            worst_param = max(params, key=params.get) if params else ""
            errs = {"out": section.relative_error(mine["out"], ref["out"]),
                    "x_grad": section.relative_error(mine["x"], ref["x"]),
                    "param_grad": max(experts.values(), default=0.0), "router_grad": max(router.values(), default=0.0)}
            ok = (all(errs[k] <= BOUND[dname] for k in ("out", "x_grad", "param_grad"))
                  and errs["router_grad"] <= ROUTER_BOUND[dname] and not missing)
            for k, v in errs.items():
                worst[dname][k] = max(worst[dname][k], v)
            rows.append({**row, "status": "ok" if ok else "FAIL", **errs, "worst_param": worst_param,
                         "grouped_mm_calls": counter.calls, "params_without_reference": missing})
            if case.name == "PatchMoE seed auto" and dname == "bf16":
                auto_bf16_calls = counter.calls
    cap = compat.device_capability(device)
    # the expectation holds where torch documents the kernel: CUDA sm90+ (on CPU auto may take it too)
    auto_ok = auto_bf16_calls is not None and (auto_bf16_calls > 0 or device.type != "cuda" or cap[0] < 9)
    failed = [f"{r['case']} {r['dtype']}" for r in rows if r["status"] == "FAIL"]
    figures = {"bound": BOUND, "router_bound": ROUTER_BOUND, "worst": worst, "auto_bf16_grouped_mm_calls": auto_bf16_calls,
               "capability": list(cap), "compat": compat.report(device), "sizes": s.__dict__,
               "cases": len(rows), "failed": failed}
    passed = not failed and auto_ok
    def top(d: str) -> float:
        return max(v for k, v in worst[d].items() if k != "router_grad")
    summary = (f"{sum(r['status'] == 'ok' for r in rows)} ok, {len(failed)} failed, "
               f"{sum(r['status'] == 'n/a' for r in rows)} n/a; worst fp32 {top('fp32'):.1e} (bound {BOUND['fp32']:.0e}), "
               f"bf16 {top('bf16'):.1e} (bound {BOUND['bf16']:.0e}); router grads bf16 "
               f"{worst['bf16']['router_grad']:.1e} (bound {ROUTER_BOUND['bf16']:g}); "
               f"auto bf16 grouped_mm calls {auto_bf16_calls} on sm{cap[0]}{cap[1]}")
    return passed, summary, figures, rows


def main(argv: list[str] | None = None) -> int:
    return section.run("layers", check, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())

"""results.md of ``make gpu-check``: the tables that go into the closing note.

  markdown(environment, sections, wall_s) -> str        (called by gpucheck/check.py)
  python3 -m gpucheck.report runs/gpu-check/results.json   # rewrite results.md from results.json
"""

from __future__ import annotations

import json
import os
import sys


def _f(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _layers(r: dict) -> list[str]:
    f = r.get("figures") or {}
    if "worst" not in f:
        return []
    out = ["", "### MoE layers vs the float64 loop reference (||ours - ref|| / ||ref||, worst case)", "",
           "| dtype | output | input grad | expert grads | bound | router grads | router bound |",
           "|---|---|---|---|---|---|---|"]
    for d, w in f["worst"].items():
        out.append(f"| {d} | {w['out']:.1e} | {w['x_grad']:.1e} | {w['param_grad']:.1e} | {f['bound'][d]:.0e} | "
                   f"{w.get('router_grad', 0.0):.1e} | {f.get('router_bound', {}).get(d, 0.0):.0e} |")
    cap = f.get("capability") or [0, 0]
    out.append("")
    out.append(f"`expert.impl=auto`, bf16, sm{cap[0]}{cap[1]}: {f.get('auto_bf16_grouped_mm_calls')} calls of "
               f"`torch._grouped_mm` per forward; cases: {f.get('cases')}, failed: {', '.join(f.get('failed') or []) or 'none'}")
    return out


def _train(r: dict) -> list[str]:
    runs = (r.get("figures") or {}).get("runs") or [x for x in r.get("rows", []) if x.get("run", "").startswith("zero")]
    if not runs:
        return []
    out = ["", "### ReID training on one GPU (configs/h100.yaml, through `msmoe train`)", "",
           "| run | result | loss first -> last | mAP (untrained) | Rank-1 | samples/s | step ms | peak GPU MiB |",
           "|---|---|---|---|---|---|---|---|"]
    for x in runs:
        if "map" in x:
            status = "fp32 for reference" if x.get("reference_only") else x["status"]
            out.append(f"| {x['run']} | {status} | {x['loss_first']:.3f} -> {x['loss_last']:.3f} | "
                       f"{x['map']:.1%} ({_f(x['map_untrained'], '.1%')}) | {_f(x.get('rank1'), '.1%')} | "
                       f"{x['samples_per_s']:.0f} | {_f(x.get('step_ms'), '.1f')} | {_f(x.get('peak_mem_mb'), '.0f')} |")
        else:
            out.append(f"| {x['run']} | FAIL: {x.get('why', '')[:120]} | | | | | | |")
    return out


def _bench(r: dict) -> list[str]:
    rows, f = r.get("rows") or [], r.get("figures") or {}
    if not rows or "name" not in rows[0]:
        return []
    out = ["", f"### Layer benchmark, fwd+bwd ({f.get('shape')} shape, {f.get('dtype')}, {f.get('gpu') or 'CPU'}); "
           f"dense GEMM peak measured in the same run: {_f(f.get('gemm_peak_tflops'), '.0f')} TFLOP/s", "",
           "| contender | median ms | TFLOP/s | share of GEMM peak | x dense (time) | x DeepSpeed (time) |",
           "|---|---|---|---|---|---|"]
    for x in rows:
        out.append(f"| {x['name']} | {x['ms_median']:.2f} | {x['tflops']:.1f} | {_f(x['fraction_of_gemm_peak'], '.1%')} | "
                   f"{x['ratio_to_dense']:.2f} | {_f(x['ratio_to_deepspeed'], '.2f')} |")
    out.append("")
    for name, g in (f.get("goals") or {}).items():
        verdict = "n/a" if g["met"] is None else ("PASS" if g["met"] else "FAIL")
        out.append(f"- goal {name} >= {g['target']:g}: {verdict} ({_f(g['value'], '.2f', 'not measured')})")
    sweep = f.get("experts_sweep") or {}
    if sweep.get("rows"):
        out += ["", f"Expert-count sweep ({sweep.get('shape')} shape, same active FLOPs; time / the dense FFN's, "
                    "paired medians):", "", "| E | PatchMoE x dense | TokenMoE x dense | DeepSpeed MoE x dense |",
                "|---|---|---|---|"]
        out += [f"| {x['experts']} | {_f(x['patchmoe_x_dense'], '.2f')} | {_f(x['tokenmoe_x_dense'], '.2f')} | "
                f"{_f(x['deepspeed_x_dense'], '.2f')} |" for x in sweep["rows"]]
    elif sweep.get("error"):
        out += ["", f"Expert-count sweep: none ({sweep['error']})"]
    return out


def markdown(env: dict, sections: dict, wall_s: float) -> str:
    head = [f"## gpu-check: {env.get('gpu') or env.get('device')}, Python {env.get('python')}, torch {env.get('torch')} "
            f"(CUDA {env.get('cuda')}), deepspeed {env.get('deepspeed')}, commit {env.get('commit')}", "",
            f"{sum(r['passed'] for r in sections.values())}/{len(sections)} sections passed in {wall_s:.0f} s.", "",
            "| section | result | seconds | summary |", "|---|---|---|---|"]
    for name, r in sections.items():
        summary = str(r.get("summary", "")).replace("|", "/")
        head.append(f"| {name} | {'PASS' if r['passed'] else 'FAIL'} | {r.get('seconds', '-')} | {summary} |")
    syncs = (sections.get("syncs") or {}).get("figures") or {}
    if syncs.get("syncs_per_step") is not None:
        head += ["", f"Host syncs per training step ({syncs['precision']}, {syncs.get('how', 'CUDA sync debug mode')}): "
                     f"{syncs['syncs_per_step']} (budget {syncs['budget']}: "
                     f"{'within' if syncs['within_budget'] else 'over'})", ""]
        if syncs.get("sites"):
            head += ["| sync site | calls over the counted steps |", "|---|---|"]
            head += [f"| `{site}` | {n} |" for site, n in syncs["sites"].items()]
    for name, part in (("layers", _layers), ("train", _train), ("bench", _bench)):
        if name in sections:
            head += part(sections[name])
    return "\n".join(head) + "\n"


def main(argv: list[str] | None = None) -> int:
    path = (argv or sys.argv[1:])[0]
    with open(path) as fh:
        data = json.load(fh)
    md = markdown(data["environment"], data["sections"], data["wall_s"])
    with open(os.path.join(os.path.dirname(path), "results.md"), "w") as fh:
        fh.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

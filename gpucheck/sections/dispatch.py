"""gpu-check section "dispatch": the all-to-all dispatcher on CUDA tensors against the local one.

  python3 -m gpucheck.sections.dispatch --json runs/gpu-check/dispatch.json            # on the GPU
  python -m gpucheck.sections.dispatch --json /tmp/d.json --device cpu --quick          # dry run (gloo only)

Two groups, each running PatchMoE with ``parallel.dispatcher.AllToAllDispatcher`` and comparing
with the same layer on ``moe.dispatch.LocalDispatcher`` (all experts, one rank at a time):
  one-rank   a process group of one rank: NCCL on CUDA (gloo on CPU); the all-to-all is a copy
  two-proc   two processes on the one GPU over gloo (NCCL refuses two ranks on one device),
             CUDA tensors through gloo's all-to-all; rounds with uneven shards, a rank with no
             patches at all, and a rank that sends nothing to the other (empty splits)
Compared: outputs, input gradients, the local experts' gradients (summed over the group by the
all-to-all backward) and the router's (summed over ranks here), in fp32, bound ``BOUND``.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from gpucheck import section
from moe import ExpertConfig, PatchMoE, PatchMoEConfig, RouterConfig
from parallel.dispatcher import AllToAllDispatcher
from parallel.groups import ExpertGroup

E, K, C, F, P = 4, 2, 16, 32, 4
BOUND = 1e-5  # fp32; only the summation order of expert gradients differs
# Rounds of per-rank shards: (images, height, width) and experts whose selection is pushed down.
# uneven: 3 vs 1 images of different sizes; empty: rank 1 has no image, rank 0 routes nothing to
# rank 1's experts (2, 3), so every split between the two ranks is empty.
ROUNDS = {
    "uneven": [((3, 8, 12), ()), ((1, 12, 8), ())],
    "empty": [((2, 8, 8), (2, 3)), ((0, 8, 8), ())],
}


def _layers(group, device: torch.device, bias: tuple[int, ...]) -> tuple[PatchMoE, PatchMoE]:
    cfg = PatchMoEConfig(dim=C, patch_size=P, router=RouterConfig(num_experts=E, top_k=K),
                         expert=ExpertConfig(kind="seed", hidden_dim=F, dropout=0.0))
    torch.manual_seed(0)
    ref = PatchMoE(cfg).to(device)
    disp = AllToAllDispatcher(ExpertGroup.of(group, E))
    ep = PatchMoE(cfg, dispatcher=disp).to(device)
    first, el = disp.first_expert, disp.num_local_experts
    with torch.no_grad():
        for name, p in ep.named_parameters():
            p.copy_(ref.get_parameter(name) if not name.startswith("experts.")
                    else getattr(ref.experts, name.split(".", 1)[1])[first:first + el])
        for layer in (ref, ep):
            layer.router.selection_bias[list(bias)] = -10.0
    return ref, ep


def _shard(shape, r: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + r)
    b, h, w = shape
    return (torch.randn(b, h, w, C, generator=gen).to(device), torch.randn(b, h, w, C, generator=gen).to(device))


def _grads(layer: PatchMoE, prefix: str) -> dict[str, torch.Tensor]:
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
            for n, p in layer.named_parameters() if n.startswith(prefix)}


def compare(group, device: torch.device, shards: list) -> dict:
    """Run one round: this rank's shard through the EP layer, every rank's through the local one."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shape, bias = shards[rank]
    ref, ep = _layers(group, device, bias)
    x, g = _shard(shape, rank, device)
    x = x.requires_grad_()
    res = ep(x)
    (res.out * g).sum().backward()
    router = _grads(ep, "router.")
    for t in router.values():  # the EP layer's router saw this rank's patches only
        dist.all_reduce(t, group=group)

    disp = ep.dispatcher
    want_out = want_x = None
    want_router = {n: torch.zeros_like(t) for n, t in router.items()}
    want_experts = {n: torch.zeros_like(p) for n, p in ref.experts.named_parameters()}
    for r in range(world):
        r_shape, r_bias = shards[r]
        with torch.no_grad():
            ref.router.selection_bias.zero_()
            ref.router.selection_bias[list(r_bias)] = -10.0
        ref.zero_grad(set_to_none=True)
        xr, gr = _shard(r_shape, r, device)
        xr = xr.requires_grad_()
        out = ref(xr).out
        (out * gr).sum().backward()
        for n, t in _grads(ref, "router.").items():
            want_router[n] += t
        for n, t in _grads(ref, "experts.").items():
            want_experts[n.split(".", 1)[1]] += t
        if r == rank:
            want_out, want_x = out.detach(), xr.grad
    first, el = disp.first_expert, disp.num_local_experts
    errors = {"out": section.relative_error(res.out, want_out), "x_grad": section.relative_error(x.grad, want_x)}
    errors.update({f"router.{n.split('.', 1)[1]}": section.relative_error(router[n], want_router[n]) for n in router})
    errors.update({f"experts.{n}": section.relative_error(p.grad, want_experts[n][first:first + el])
                   for n, p in ep.experts.named_parameters()})
    return {"rank": rank, "world": world, "units": res.stats.num_units,
            "sent_rows": int(res.stats.kept.sum()), "load": res.stats.load.tolist(),
            "max_error": max(errors.values()), "worst": max(errors, key=errors.get)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank(device: torch.device) -> dict:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)  # set_device refuses a device without an index
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True, timeout=timedelta(seconds=60))
    dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        rows = {name: compare(dist.group.WORLD, device, shards[:1]) for name, shards in ROUNDS.items()}
    finally:
        dist.destroy_process_group()
    return {"backend": backend, "rounds": rows}


def worker(args) -> int:
    """One of the two ranks (under torchrun): every round, then rank<r>.json in the workdir."""
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", 0)  # both ranks on the one GPU
        torch.cuda.set_device(device)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rows = {name: compare(dist.group.WORLD, device, shards) for name, shards in ROUNDS.items()}
    with open(os.path.join(args.workdir, f"rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(rows, fh)
    dist.destroy_process_group()
    return 0


def two_proc(args) -> dict:
    for old in glob.glob(os.path.join(args.workdir, "rank*.json")):
        os.remove(old)
    from parallel.launchenv import torchrun_command

    cmd = torchrun_command(2, ["-m", "gpucheck.sections.dispatch", "--worker", "--json", args.json, "--device",
                               args.device, "--workdir", args.workdir])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    files = sorted(glob.glob(os.path.join(args.workdir, "rank*.json")))
    if proc.returncode != 0 or len(files) != 2:
        tail = (proc.stdout + proc.stderr)[-2500:]
        return {"backend": "gloo", "error": f"torchrun exited {proc.returncode} with {len(files)} rank reports",
                "log_tail": tail}
    per_rank = [json.load(open(f)) for f in files]
    return {"backend": "gloo", "rounds": {name: [r[name] for r in per_rank] for name in ROUNDS}}


def check(args) -> tuple[bool, str, dict, list]:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {"one-rank": one_rank(device), "two-proc": two_proc(args)}
    rows, worst, errors = [], 0.0, []
    for group_name, res in results.items():
        if "error" in res:
            errors.append(f"{group_name}: {res['error']}")
            rows.append({"group": group_name, "backend": res["backend"], "status": "FAIL", **res})
            continue
        for round_name, per_rank in res["rounds"].items():
            for r in (per_rank if isinstance(per_rank, list) else [per_rank]):
                ok = r["max_error"] <= BOUND
                worst = max(worst, r["max_error"])
                rows.append({"group": group_name, "backend": res["backend"], "round": round_name,
                             "status": "ok" if ok else "FAIL", **r})
    failed = [f"{r['group']}/{r.get('round', '')}/rank{r.get('rank', '?')}" for r in rows if r["status"] == "FAIL"]
    passed = not failed and not errors
    summary = (f"one-rank {results['one-rank']['backend']} and two-proc gloo on {device.type}: "
               f"{len(rows) - len(failed)}/{len(rows)} ok, worst relative error {worst:.1e} (bound {BOUND:.0e})"
               + (f"; {'; '.join(errors)}" if errors else ""))
    return passed, summary, {"worst": worst, "bound": BOUND, "failed": failed}, rows


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--worker" in argv:
        args = section.parser(__doc__).parse_args([a for a in argv if a != "--worker"])
        return worker(args)
    return section.run("dispatch", check, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())

"""``msmoe train`` on an emulated cluster, as the cluster tests run it: one torchrun agent per node
(cluster/agents.py) running ``python -m launcher.cli train`` on the tiny config with a synthetic set
made once per session, and the runs' summaries and final weights read back (plain state dicts of the
newest checkpoint, experts stacked by global id: parallel/consolidate.py, the same keys at every EP
size)."""

import json
import os

from cluster.agents import Agents, AgentSpec
from parallel.consolidate import consolidated_state
from tests.helpers import ROOT, TINY_DATA, cli_command, cli_env, run_cli
from training.checkpoint import store

STEPS = 4
EXPERTS = 8


def tiny_args(tmp, data, name, *overrides, steps=STEPS):
    """``msmoe train`` arguments for run ``name`` under ``tmp``/runs on the shared data set ``data``."""
    return ["train", "--config", "configs/tiny.yaml", "--no-progress", f"name={name}", f"out_dir={tmp}/runs",
            f"data.path={data}", f"data.synth={TINY_DATA}", f"train.steps={steps}", "train.ckpt_every=2",
            "train.log_every=1", "eval.untrained=false", f"model.patch_moe.router.num_experts={EXPERTS}", *overrides]


def cluster_train(net, tmp, data, name, nproc, *overrides, spec=None, env=None, timeout=600, wait=True, **kw):
    """Run ``name`` on every node of ``net`` with ``nproc`` processes each; returns the Agents (their logs
    under ``tmp``/logs/``name``), waited for unless ``wait=False`` (then the caller enters and waits)."""
    target = tuple(cli_command(*tiny_args(tmp, data, name, *overrides, **kw))[1:])  # without the interpreter
    agents = Agents(net, AgentSpec(nproc, target, rdzv_id=f"t-{name}", **(spec or {})),
                    os.path.join(tmp, "logs", name), env=cli_env(env), cwd=ROOT)
    if not wait:
        return agents
    with agents:
        agents.wait(timeout)
    return agents


def local_train(tmp, data, name, nproc, *overrides, **kw):
    """The same run on this machine alone (torchrun --standalone on loopback): the reference."""
    return run_cli(*tiny_args(tmp, data, name, *overrides, **kw), nproc=nproc, timeout=600, check=True)


def summary(tmp, name) -> dict:
    with open(os.path.join(tmp, "runs", name, "summary.json")) as fh:
        return json.load(fh)


def final_weights(tmp, name) -> dict:
    ckpt = os.path.join(tmp, "runs", name, "checkpoints")
    return consolidated_state(os.path.join(ckpt, store.newest_complete(ckpt)))


def max_weight_difference(a: dict, b: dict) -> tuple[float, str]:
    """The largest absolute difference between two runs' weights, and the tensor it is in."""
    assert a.keys() == b.keys() and len(a) > 10, sorted(set(a) ^ set(b))
    return max((float((a[k].double() - b[k].double()).abs().max()), k) for k in a)

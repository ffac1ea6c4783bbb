"""A node fails (issue 28, item 5): 2 emulated nodes x 2 processes train under an elastic
``--nnodes 1:2`` rendezvous with ``--max-restarts 1``; after step HOLD_AFTER one rank stops
(MSMOE_FAULT stall@HOLD_AFTER, training/faults.py: the run is held there, so the kill comes at a known step) and
node 1 is killed whole (its agent and workers). Node 0's workers fail in their next collective, its
agent restarts them, the rendezvous closes at 1 node; the job (``--auto-resume``, train.elastic_ep with
ep_size=4) continues at world 2, EP=2, from the newest verified checkpoint, and finishes.

Checked: steps lost (done before the kill, minus the step resumed from) <= ckpt_every; the summary has
every step; the loss curve continues the killed run's: its first steps are the uninterrupted 4-process
run's, and the whole curve and the final weights are those of that run's checkpoint continued on 2
processes of one machine (deterministic; SAME_ATOL). The uninterrupted 4-process run's final loss is
printed beside the recovered run's (another world size from the resume on: close, not equal).
"""

import glob
import re
import shutil
import time

import pytest

from tests.cluster.training import cluster_train, final_weights, local_train, max_weight_difference, summary

STEPS, CKPT_EVERY, HOLD_AFTER = 8, 3, 5  # a checkpoint after step 3; held after step 5, before the step-6 one
SAME_ATOL = 1e-6
ELASTIC = ("train.ep_size=4", "train.elastic_ep=true", f"train.ckpt_every={CKPT_EVERY}")


def _steps_logged(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"step (\d+)/\d+ ", log)]


@pytest.mark.slow
def test_a_killed_node_the_survivors_resume_smaller_and_finish(make_cluster, cluster_data, tmp_path):
    net, tmp = make_cluster(2, 1000.0), str(tmp_path)
    agents = cluster_train(net, tmp, cluster_data, "killed", 2, *ELASTIC, "--auto-resume", steps=STEPS, wait=False,
                           spec={"nnodes": "1:2", "max_restarts": 1},
                           env={"MSMOE_FAULT": f"stall@{HOLD_AFTER}:3"})  # rank 3: on node 1
    with agents:
        deadline = time.monotonic() + 300
        while HOLD_AFTER not in _steps_logged(agents.log(0)) or not glob.glob(f"{tmp}/runs/killed/checkpoints/"
                                                                               "step0000003/COMMITTED"):
            assert time.monotonic() < deadline and all(c is None for c in agents.poll()), agents.log(0)[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # every rank is now inside step HOLD_AFTER + 1, waiting on rank 3
        killed = agents.kill_node(1)
        codes = agents.wait(400)
    assert codes == [0, -9] and len(killed) >= 3
    log = agents.log(0)
    before, sep, after = log.partition("resumed 'killed' at step ")
    assert sep, log[-3000:]
    resumed_at = int(re.match(r"\d+", after).group())
    done = max(_steps_logged(before))
    lost = done - resumed_at
    assert (done, resumed_at) == (HOLD_AFTER, 3) and 0 <= lost <= CKPT_EVERY
    assert after.startswith(f"{resumed_at} (resharded EP 4 -> 2; elastic restart 1)"), after[:200]
    s = summary(tmp, "killed")
    assert (s["world_size"], s["ep_size"], s["steps"], len(s["loss_history"])) == (2, 2, STEPS, STEPS)

    # the references on one machine: the uninterrupted 4-process run, and its step-3 checkpoint continued on 2
    local_train(tmp, cluster_data, "ref", 4, *ELASTIC, "--stop-at", str(resumed_at), steps=STEPS)
    shutil.copytree(f"{tmp}/runs/ref", f"{tmp}/runs/ref2")
    local_train(tmp, cluster_data, "ref", 4, *ELASTIC, "--auto-resume", steps=STEPS)
    local_train(tmp, cluster_data, "ref2", 2, *ELASTIC, "--auto-resume", steps=STEPS)
    four, two = summary(tmp, "ref"), summary(tmp, "ref2")
    assert s["loss_history"][:resumed_at] == four["loss_history"][:resumed_at]
    assert s["loss_history"] == pytest.approx(two["loss_history"], rel=0, abs=SAME_ATOL)
    worst, where = max_weight_difference(final_weights(tmp, "killed"), final_weights(tmp, "ref2"))
    assert worst <= SAME_ATOL, (worst, where)
    print(f"node killed in step {HOLD_AFTER + 1}: {done} steps done, resumed at {resumed_at} (lost {lost} <= ckpt_every "
          f"{CKPT_EVERY}), world 4 EP=4 -> world 2 EP=2; final loss {s['final_loss']:.6f} vs uninterrupted "
          f"4-process {four['final_loss']:.6f}; = the step-{resumed_at} checkpoint continued on 2 processes "
          f"(weights within {worst:.2g})")

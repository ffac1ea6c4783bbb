"""SLURM for real: a one-node controller + node daemon on this machine (tests/slurm.py).

1. `msmoe ablate --submit` runs `msmoe submit` per run: it writes the sbatch script into the run
   directory, submits it, the job trains with 2 processes (EP=2), and the table is written from
   the trained results once the job finished.
2. Preemption: `scancel --signal=USR1` mid-run; the trainers stop after the same step, checkpoint,
   requeue the job; the requeued job resumes from that checkpoint and finishes - with the same
   loss curve as an uninterrupted run, so no step was lost or repeated.
"""

import csv
import json
import os
import re
import shutil
import time

import pytest

from tests.helpers import ROOT, TINY_DATA, free_port, run_cli
from tests.slurm import Cluster, available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available()))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("slurm"))).start()
    yield c
    c.stop()


def _submit(cluster, tmp, name, *overrides):
    """Submitted from the user's own folder (``tmp``) with a config path relative to it: the job runs there."""
    for src, dst in (("tiny.yaml", "my-tiny.yaml"), ("default.yaml", "default.yaml")):  # tiny's base: beside it
        shutil.copy(os.path.join(ROOT, "configs", src), os.path.join(tmp, dst))
    proc = run_cli(  # the environment as it is (no OMP_NUM_THREADS=1): sbatch passes it on to the job
        "submit", "--nodes", "1", "--gpus-per-node", "2", "--device", "cpu", "--time", "00:20:00", "--partition",
        "debug", "--port", str(_port()), "--", "--config", "my-tiny.yaml", f"name={name}", f"out_dir={tmp}/runs",
        f"data.path={tmp}/data", f"data.synth={TINY_DATA}", "train.ep_size=2", *overrides,
        env=cluster.env, threads=None, timeout=120, cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+", job), proc.stdout
    return job


def _port():
    return free_port()


def _log(tmp, name, job):
    path = os.path.join(tmp, "runs", name, f"slurm-{job}.out")
    return open(path).read() if os.path.exists(path) else ""


def test_preemption_requeues_and_resumes_without_losing_a_step(cluster, tmp_path):
    tmp = str(tmp_path)
    steps, first_ckpt = 160, 10
    # enough steps that the signal lands mid-run however fast the machine is: it is sent once the
    # first checkpoint (step 10) exists, with 150 steps still to go
    common = (f"train.steps={steps}", f"train.ckpt_every={first_ckpt}", "eval.untrained=true")
    # the uninterrupted reference, same config, straight under torchrun
    ref = run_cli("train", "--config", "configs/tiny.yaml", "--no-progress", "name=ref", f"out_dir={tmp}/runs",
                  f"data.path={tmp}/data", f"data.synth={TINY_DATA}", "train.ep_size=2", *common, nproc=2, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    job = _submit(cluster, tmp, "pre", *common)
    run = os.path.join(tmp, "runs", "pre")
    deadline = time.time() + 300
    latest = os.path.join(run, "checkpoints", "latest")
    while not os.path.exists(latest):  # the first checkpoint: training is under way
        assert time.time() < deadline, _log(tmp, "pre", job) + cluster.logs()
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", job)
    # SLURM holds a requeued batch job for about two minutes (its BeginTime); once it is back in the
    # queue, release it now as an operator would, so the test need not wait
    deadline = time.time() + 300
    while cluster.job_state(job)[1] < 1 or cluster.job_state(job)[0] != "PENDING":
        if cluster.job_state(job)[0] in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        assert time.time() < deadline, _log(tmp, "pre", job) + cluster.logs()
        time.sleep(0.5)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    state = cluster.wait(job, timeout=900)
    log = _log(tmp, "pre", job)
    assert state == "COMPLETED", f"{state}\n{log}\n{cluster.logs()}"
    _, restarts = cluster.job_state(job)
    m = re.search(r"preempted \(signal 10\): checkpoint at step (\d+)", log)
    assert m, log
    stopped = int(m.group(1))
    assert first_ckpt <= stopped < steps, log
    assert f"requeued SLURM job {job}" in log and restarts >= 1
    assert f"resumed 'pre' at step {stopped}" in log
    a, b = json.load(open(f"{tmp}/runs/ref/summary.json")), json.load(open(os.path.join(run, "summary.json")))
    assert b["steps"] == steps and len(b["loss_history"]) == steps
    assert b["loss_history"] == a["loss_history"]  # nothing lost, nothing repeated
    assert b["map"] == pytest.approx(a["map"], abs=1e-6)


def test_ablate_through_submit_queues_each_run_and_writes_the_table(cluster, tmp_path):
    """`msmoe ablate --submit`: every run a SLURM job (2 processes, EP=2), the table once they finished;
    a second call keeps the finished run and submits nothing."""
    tmp = str(tmp_path)
    args = ["ablate", "--configs", "configs/tiny.yaml", "--out", f"{tmp}/abl", "--submit", "--nodes", "1",
            "--gpus-per-node", "2", "--device", "cpu", "--time", "00:20:00", "--partition", "debug", "--port",
            str(_port()), "--poll", "1", "train.steps=4", "train.ep_size=2", "eval.untrained=false",
            "eval.missing_modalities=false", f"data.path={tmp}/data", f"data.synth={TINY_DATA}"]
    first = run_cli(*args, env=cluster.env, threads=None, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:] + cluster.logs()
    job = open(f"{tmp}/abl/tiny/slurm_job_id").read().strip()
    assert f"submitted job {job}" in first.stdout and "finished (job" in first.stdout
    script = open(f"{tmp}/abl/tiny/submit.sbatch").read()  # what `msmoe submit` wrote and sbatch ran
    assert "--rdzv_backend=c10d" in script and "#SBATCH --nodes=1" in script
    s = json.load(open(f"{tmp}/abl/tiny/summary.json"))
    assert s["world_size"] == 2 and s["ep_size"] == 2 and s["steps"] == 4
    rows = list(csv.DictReader(open(f"{tmp}/abl/ablation.csv")))
    assert [r["run"] for r in rows] == ["tiny"] and float(rows[0]["map"]) == pytest.approx(s["map"])
    again = run_cli(*args, env=cluster.env, threads=None, timeout=300)
    assert again.returncode == 0 and "finished before, kept" in again.stdout and "submitted" not in again.stdout
    assert open(f"{tmp}/abl/tiny/slurm_job_id").read().strip() == job

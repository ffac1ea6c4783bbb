"""What a cluster user sees of a run, all from ONE short 2-process run of configs/tiny.yaml (EP=2)
whose stdout is a pipe (not a terminal):

  * metrics.jsonl: one line per logging step with the losses, learning rate, throughput, stage times,
    per-layer expert load and dropped fraction, active experts and all-to-all bytes, equal to
    summary.json's history; TensorBoard's event file reads back the same values (its own reader);
  * the log: one plain line per logging step, no carriage returns (no tqdm bar), rank 1's lines
    prefixed ``[rank 1]``;
  * train.profile_steps: a Chrome trace per rank that loads as JSON and holds the MoE stage ranges
    of exactly the profiled steps, and the top-operator table in the log.
"""

import json
import os
import re

import pytest

from tests.helpers import TINY_DATA, run_cli

STEPS, LOG_EVERY, PROFILE = 6, 2, (3, 4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("obs"))
    proc = run_cli("train", "--config", "configs/tiny.yaml", "name=obs", f"out_dir={tmp}/runs", f"data.path={tmp}/data",
                   f"data.synth={TINY_DATA}", "train.ep_size=2", f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}",
                   f"train.profile_steps=[{PROFILE[0]},{PROFILE[1]}]", "eval.untrained=false",
                   "eval.missing_modalities=false", nproc=2, check=True)
    run_dir = os.path.join(tmp, "runs", "obs")
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    return proc, run_dir, summary, records


@pytest.mark.slow
def test_metrics_jsonl_holds_one_record_per_logging_step_equal_to_the_summary(run):
    _, _, summary, records = run
    h = summary["history"]
    assert [r["step"] for r in records] == [2, 4, 6] == h["load_steps"]
    for i, r in enumerate(records):
        s = r["step"] - 1  # the history is per step, from step 1
        assert r["loss"] == {"total": h["loss"][s], "id": h["id"][s], "triplet": h["triplet"][s], "aux": h["aux"][s]}
        assert r["lr"] == h["lr"][s]
        assert r["samples_per_s"] > 0 and r["eta_s"] >= 0 and r["step_time_ms"]["step"] > 0
        load = h["load"][i][0]  # block1's routed patches per expert in this interval
        assert r["expert_load"]["block1"] == pytest.approx([x / sum(load) for x in load], rel=1e-12)
        assert sum(r["expert_load"]["block1"]) == pytest.approx(1.0)
        assert r["dropped_fraction"]["block1"] == pytest.approx(h["dropped"][i], abs=1e-12)
        assert r["active_experts"] == pytest.approx(h["active"][i], rel=1e-12) and r["active_experts"] > 0
        assert r["a2a_bytes_per_step"]["total"] >= r["a2a_bytes_per_step"]["offrank"] > 0  # EP=2 moves patches
    # the stage breakdown comes from the interval's sampled step (steps 4 and 6; none in the first interval)
    assert set(records[0]["step_time_ms"]) == {"step"}
    for r in records[1:]:
        assert {"data", "forward", "backward", "optimizer", "route", "dispatch", "experts",
                "combine"} <= set(r["step_time_ms"])
    assert records[-1]["eta_s"] == 0


@pytest.mark.slow
def test_tensorboard_reads_back_the_same_values(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _, records = run
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    for tag, get in (("loss/total", lambda r: r["loss"]["total"]), ("loss/triplet", lambda r: r["loss"]["triplet"]),
                     ("lr", lambda r: r["lr"]), ("expert_load/block1/0", lambda r: r["expert_load"]["block1"][0]),
                     ("a2a_bytes_per_step/offrank", lambda r: r["a2a_bytes_per_step"]["offrank"])):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in records], tag
        assert [e.value for e in events] == pytest.approx([get(r) for r in records], rel=1e-6), tag  # float32
    images = acc.Images("expert_load")
    assert [i.step for i in images] == [2, 4, 6] and images[0].width == 4 * 12 and images[0].height == 12


@pytest.mark.slow
def test_log_has_one_plain_line_per_logging_step_and_ranked_lines(run):
    proc, _, summary, records = run
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("train obs step ")]
    assert len(lines) == STEPS // LOG_EVERY
    for ln, r in zip(lines, records):
        m = re.match(r"train obs step (\d+)/(\d+)  loss (\S+) .* (\S+) samples/s  ETA (\d+:\d\d:\d\d)$", ln)
        assert m, ln
        assert int(m.group(1)) == r["step"] and int(m.group(2)) == STEPS
        assert float(m.group(3)) == pytest.approx(r["loss"]["total"], abs=6e-5)
        assert float(m.group(4)) == pytest.approx(r["samples_per_s"], abs=0.06)
    # DeepSpeed's start-up warning on a CPU machine comes from both ranks: rank 1's carries its rank
    accel = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Setting accelerator to CPU" in ln]
    assert sorted(ln.startswith("[rank 1] ") for ln in accel) == [False, True], accel
    assert not any(ln.startswith("[rank 0]") for ln in proc.stdout.splitlines())


@pytest.mark.slow
def test_profile_writes_a_chrome_trace_per_rank_with_the_moe_stages(run):
    proc, run_dir, _, _ = run
    for rank in (0, 1):
        with open(os.path.join(run_dir, "profile", f"trace_rank{rank}.json")) as fh:
            trace = json.load(fh)
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"moe.route", "moe.dispatch", "moe.experts", "moe.combine"} <= names, rank
        assert {n for n in names if n and n.startswith("train.step")} == {"train.step 3", "train.step 4"}
    assert f"profile of steps {PROFILE[0]}-{PROFILE[1]}" in proc.stdout
    table = proc.stdout.split(f"profile of steps {PROFILE[0]}-{PROFILE[1]}")[1]
    assert "Self CPU %" in table and "# of Calls" in table

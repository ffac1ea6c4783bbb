"""Reliability: crashes, stalls, non-finite steps and bad input, each against what a user sees.

Faults are real: a worker SIGKILLed mid-run (or mid-checkpoint), a rank that stops calling
collectives, a NaN loss (training/faults.py injects them at a given step). Recovered runs are
compared with an uninterrupted run of the same seed: same loss curve, bit-identical weights.
"""

import glob
import json
import math
import os
import subprocess
import threading
import time

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, TINY_DATA, cli_command, cli_env, mounted_tmpfs
from training.checkpoint import store

STEPS = 30


def _env(fault: str | None = None) -> dict:
    return cli_env({"MSMOE_FAULT": fault or None})


def _train_cmd(tmp, name, nproc=2, restarts=0, extra=()):
    common = ["--config", "configs/tiny.yaml", "--no-progress", f"name={name}", f"out_dir={tmp}/runs",
              f"data.path={tmp}/data", f"data.synth={TINY_DATA}", f"train.steps={STEPS}", "train.ckpt_every=5",
              "eval.untrained=false", *extra]
    if nproc == 1:
        return cli_command("train", *common)
    return cli_command("train", "train.ep_size=2", *common, nproc=nproc, torchrun=[f"--max-restarts={restarts}"])


def _run(cmd, fault=None, timeout=600):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(fault), timeout=timeout)


def _weights(ckpt_dir: str) -> dict:
    """Every tensor of every model-state file of the newest complete checkpoint (experts included)."""
    tag = store.newest_complete(ckpt_dir)
    out = {}
    for path in sorted(glob.glob(os.path.join(ckpt_dir, tag, "*model_states.pt"))):
        state = torch.load(path, map_location="cpu", weights_only=False)
        state = state.get("module", state) if isinstance(state, dict) else state
        for k, v in state.items():
            if torch.is_tensor(v):
                out[f"{os.path.basename(path)}:{k}"] = v
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-rank EP=2 run every recovered run must reproduce."""
    tmp = str(tmp_path_factory.mktemp("ref"))
    proc = _run(_train_cmd(tmp, "ref"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, json.load(open(f"{tmp}/runs/ref/summary.json")), _weights(f"{tmp}/runs/ref/checkpoints")


def _same_as_reference(reference, run_dir):
    _, ref_summary, ref_w = reference
    s = json.load(open(os.path.join(run_dir, "summary.json")))
    assert s["steps"] == STEPS and s["loss_history"] == ref_summary["loss_history"]  # no step lost or repeated
    w = _weights(os.path.join(run_dir, "checkpoints"))
    strip = {k.split(":", 1)[1]: v for k, v in w.items()}
    ref = {k.split(":", 1)[1]: v for k, v in ref_w.items()}
    assert strip.keys() == ref.keys() and len(ref) > 10
    for k in ref:
        assert torch.equal(strip[k], ref[k]), k


@pytest.mark.slow
def test_sigkill_of_a_worker_restarts_from_the_newest_checkpoint(tmp_path, reference):
    proc = _run(_train_cmd(str(tmp_path), "killed", restarts=1), fault="kill@17:1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "SIGKILL rank 1 at step 17" in out and "resumed 'killed' at step 15 (elastic restart 1)" in out
    _same_as_reference(reference, f"{tmp_path}/runs/killed")


@pytest.mark.slow
def test_kill_during_checkpoint_save_resumes_from_the_previous_one(tmp_path, reference):
    ckpt = f"{tmp_path}/runs/mid/checkpoints"
    proc = _run(_train_cmd(str(tmp_path), "mid"), fault="kill_in_save@10")
    assert proc.returncode != 0
    partial = store.incomplete(ckpt)  # written into a fresh directory, never committed nor renamed
    assert len(partial) == 1 and partial[0].startswith("step0000010.partial-")
    # rank 1, waiting for rank 0 in the save's agreement, names the collective (was: gloo's raw traceback)
    assert ("[rank 1] msmoe: error: collective 'all-gather of every rank's checkpoint outcome' failed on rank 1: "
            "another rank died or stopped calling it") in proc.stderr, proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if line.startswith("[rank 1]") and "Traceback" in line]
    assert store.newest_complete(ckpt) == "step0000005" and open(f"{ckpt}/latest").read() == "step0000005"
    again = _run(_train_cmd(str(tmp_path), "mid", extra=["--resume"]))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed 'mid' at step 5" in again.stdout
    assert store.incomplete(ckpt) == []
    _same_as_reference(reference, f"{tmp_path}/runs/mid")


@pytest.mark.slow
def test_a_rank_that_stops_calling_collectives_fails_the_others_in_time(tmp_path):
    timeout_s = 8
    cmd = _train_cmd(str(tmp_path), "stall", extra=[f"train.collective_timeout_s={timeout_s}"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=_env("stall@3:1"))
    seen: dict[str, float] = {}
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            for key in ("stops calling collectives", "msmoe: error: collective"):
                if key in line and key not in seen:
                    seen[key] = time.monotonic()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    proc.wait(timeout=300)
    t.join(timeout=10)
    text = "".join(lines)
    assert proc.returncode != 0
    assert "collective 'all-to-all of per-expert patch counts (dispatch)' failed on rank 0" in text, text[-3000:]
    assert "Timed out" in text
    waited = seen["msmoe: error: collective"] - seen["stops calling collectives"]
    assert timeout_s - 1 <= waited <= timeout_s + 15, waited


def test_nan_steps_are_skipped_then_the_run_stops_with_a_checkpoint(tmp_path):
    tmp = str(tmp_path)
    ok = _run(_train_cmd(tmp, "nan", nproc=1, extra=["train.steps=10"]), fault="nan_loss@4;nan_loss@5")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "step 5: non-finite loss or gradients on some rank: step skipped (1 in a row" in ok.stdout
    text = open(f"{tmp}/runs/nan/summary.json").read()
    s = json.loads(text, parse_constant=lambda c: pytest.fail(f"summary.json holds {c}: not strict JSON"))
    assert s["skipped_steps"] == [4, 5] and s["loss_history"][4] is None and s["loss_history"][5] is None
    assert all(math.isfinite(v) for i, v in enumerate(s["loss_history"]) if i not in (4, 5))

    halt = _run(_train_cmd(tmp, "halt", nproc=1, extra=["train.steps=10", "train.max_bad_steps=2"]),
                fault="nan_loss@4;nan_loss@5")
    assert halt.returncode == 3
    assert "2 steps in a row (up to step 6) had a non-finite loss" in halt.stderr
    assert store.newest_complete(f"{tmp}/runs/halt/checkpoints") == "step0000006"


def _fake_dataset(path, nir_channels=1, dtype="uint8", nan=False, h=64, w=32):
    """A tiny dataset in msmoe's on-disk layout, made with `datasets` directly (as another importer might)."""
    from datasets import Array3D, Dataset, DatasetDict, Features, Value

    from reid.data import META_FILE

    feats = Features({"rgb": Array3D((3, h, w), dtype), "nir": Array3D((nir_channels, h, w), dtype),
                      "tir": Array3D((1, h, w), dtype), "pid": Value("int32"), "camid": Value("int32"),
                      "name": Value("string")})
    rng = np.random.default_rng(0)

    def split(n_ids):
        rows = {k: [] for k in feats}
        for i in range(n_ids * 4):
            rgb = rng.integers(0, 255, (3, h, w)).astype(dtype)
            if nan:
                rgb[0, 0, 0] = np.nan
            rows["rgb"].append(rgb)
            rows["nir"].append(rng.integers(0, 255, (nir_channels, h, w)).astype(dtype))
            rows["tir"].append(rng.integers(0, 255, (1, h, w)).astype(dtype))
            rows["pid"].append(i // 4)
            rows["camid"].append(i % 2)
            rows["name"].append(f"{i // 4:04d}_c{i % 2}_{i:03d}.png")
        return Dataset.from_dict(rows, features=feats)

    DatasetDict({"train": split(8), "query": split(2), "gallery": split(2)}).save_to_disk(os.path.join(path, "arrow"))
    with open(os.path.join(path, META_FILE), "w") as fh:
        json.dump({"kind": "disk"}, fh)


@pytest.mark.parametrize("case,expect", [
    ("nir3", "nir images have shape (3, 64, 32), expected (1, H, W)"),
    ("nan", "non-finite pixels (NaN/inf) in the rgb image(s) ['"),
    ("stride", "images of 66x32 in"),
    ("few_ids", "identities but train.p=10"),
])
def test_bad_input_is_named(tmp_path, case, expect):
    data = str(tmp_path / "data")
    _fake_dataset(data, nir_channels=3 if case == "nir3" else 1, dtype="float32" if case == "nan" else "uint8",
                  nan=case == "nan", h=66 if case == "stride" else 64)
    extra = {"few_ids": ["train.p=10"]}.get(case, [])
    cmd = cli_command("train", "--config", "configs/tiny.yaml", "--no-progress", f"out_dir={tmp_path}/runs",
                      f"data.path={data}", "data.source=disk", "eval.untrained=false", "train.steps=2", *extra)
    proc = _run(cmd)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_checkpoint_of_another_model_shape_is_named(tmp_path):
    tmp = str(tmp_path)
    first = _run(_train_cmd(tmp, "shape", nproc=1, extra=["train.steps=5"]))
    assert first.returncode == 0, first.stderr[-2000:]
    other = _run(_train_cmd(tmp, "shape", nproc=1, extra=["train.steps=10", "--resume",
                                                            "model.patch_moe.expert.hidden_dim=32"]))
    assert other.returncode == 2 and "Traceback" not in other.stderr
    # refused before anything loads (training/checkpoint/model_change.py), naming the field and the way back
    assert "--resume: this config changes the model of run 'shape'" in other.stderr, other.stderr[-2000:]
    assert "model.patch_moe.expert.hidden_dim" in other.stderr and "64" in other.stderr and "32" in other.stderr
    assert "with the saved values (model.patch_moe.expert.hidden_dim=64)" in other.stderr


# ---- checkpoint integrity (training/checkpoint/manifest.py, training/checkpoint/store.py: resume, save)

def _damage(path: str, how: str) -> None:
    size = os.path.getsize(path)
    if how == "flip":  # same size, other bytes in the middle
        with open(path, "r+b") as fh:
            fh.seek(size // 2)
            chunk = fh.read(16)
            fh.seek(size // 2)
            fh.write(bytes(b ^ 0xFF for b in chunk))
        assert os.path.getsize(path) == size
    else:
        os.truncate(path, size // 2)


def _verify(path):
    return _run(cli_command("checkpoints", "verify", path))


def test_flipped_bytes_in_the_newest_checkpoint_resume_from_the_previous_one(tmp_path):
    tmp = str(tmp_path)
    ckpt = f"{tmp}/runs/flip/checkpoints"
    first = _run(_train_cmd(tmp, "flip", nproc=1, extra=["train.steps=10"]))
    assert first.returncode == 0, first.stderr[-3000:]
    assert [t for _, t, c in store.list_steps(ckpt) if c] == ["step0000005", "step0000010"]
    assert _verify(f"{tmp}/runs/flip").returncode == 0
    model = f"{ckpt}/step0000010/mp_rank_00_model_states.pt"
    before = _weights(ckpt)
    _damage(model, "flip")

    check = _verify(f"{tmp}/runs/flip")
    assert check.returncode == 1, check.stdout
    assert "step0000010 (step 10): mp_rank_00_model_states.pt: blake2b differs" in check.stdout
    assert "newest complete: step0000010, mismatch; --resume would use step0000005" in check.stdout

    again = _run(_train_cmd(tmp, "flip", nproc=1, extra=["train.steps=10", "--resume"]))
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert (f"warning: checkpoint step0000010 (step 10) in {ckpt}: mp_rank_00_model_states.pt: blake2b differs: "
            f"the bytes changed after the save") in out
    assert "resuming from step0000005 (step 5), the newest verified checkpoint, instead of step0000010" in out
    assert "resumed 'flip' at step 5" in again.stdout
    after = _weights(ckpt)  # step 10 computed again from step 5: the weights saved before the damage
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert _verify(ckpt).returncode == 0


@pytest.mark.slow
def test_truncated_expert_file_on_two_ranks_both_resume_from_the_previous_step(tmp_path, reference):
    tmp = str(tmp_path)
    run = f"{tmp}/runs/trunc"
    first = _run(_train_cmd(tmp, "trunc"))
    assert first.returncode == 0, first.stderr[-3000:]
    expert = sorted(glob.glob(f"{run}/checkpoints/step0000030/layer_*_expert_*_mp_rank_00_model_states.pt"))[-1]
    size = os.path.getsize(expert)
    _damage(expert, "truncate")
    name = os.path.basename(expert)

    check = _verify(run)
    assert check.returncode == 1
    assert f"step0000030 (step 30): {name}: size {size // 2} != {size} in the manifest" in check.stdout

    again = _run(_train_cmd(tmp, "trunc", extra=["--resume"]))
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert out.count(f"{name}: size {size // 2} != {size} in the manifest") == 1  # reported once, by rank 0
    assert "resuming from step0000025 (step 25), the newest verified checkpoint, instead of step0000030" in out
    assert "resumed 'trunc' at step 25" in again.stdout
    _same_as_reference(reference, run)  # both ranks continued from step 25: the same weights as never damaged
    assert _verify(run).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (room for two tiny checkpoints of ~1.2 MB, not a third); skips where mounting
    is not allowed."""
    with mounted_tmpfs(str(tmp_path / "small"), "3m") as mnt:
        yield mnt


def test_disk_full_during_a_save_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, small_disk):
    tmp = str(tmp_path)
    cmd = _train_cmd(tmp, "full", nproc=1, extra=["train.steps=20", "train.keep_last=5", f"out_dir={small_disk}"])
    proc = _run(cmd)
    ckpt = f"{small_disk}/full/checkpoints"
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "msmoe: error: checkpoint at step 15 could not be written (rank 0: " in err, err[-3000:]
    assert f"{ckpt}/step0000015.partial-" in err and ": No space left on device (" in err and " bytes free on its filesystem)" in err
    assert ("step0000015 was not committed and its unfinished directory is removed; step0000010 is still the newest "
            "complete checkpoint") in err
    assert "Traceback" not in err and "basic_ios" not in err
    assert store.newest_complete(ckpt) == "step0000010" and open(f"{ckpt}/latest").read() == "step0000010"
    assert store.incomplete(ckpt) == []  # the failed save's files are gone: the space is back
    check = _verify(ckpt)
    assert check.returncode == 0 and "newest complete: step0000010, verified" in check.stdout, check.stdout


def test_disk_full_after_the_final_commit_names_the_report_and_resume_writes_it(tmp_path, small_disk):
    """The disk fills (for real: MSMOE_FAULT=fill_disk) once the step-10 checkpoint is committed: the
    report's first write fails, named; nothing half-written, no COMPLETE; freed, --resume writes the
    report without training a step."""
    tmp = str(tmp_path)
    cmd = _train_cmd(tmp, "full", nproc=1, extra=["train.steps=10", f"out_dir={small_disk}"])
    run = f"{small_disk}/full"
    proc = _run(cmd, fault="fill_disk@10")
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert (f"msmoe: error: the run's report could not be written ({run}/summary.json: No space left on device "
            "(0 bytes free on its filesystem)); training is done and its checkpoint step0000010 (step 10) is "
            f"committed and safe in {run}/checkpoints") in err, err[-3000:]
    assert "--resume` (it evaluates step0000010 again)" in err and "Traceback" not in err
    left = sorted(os.listdir(run))
    assert not [f for f in left if f.endswith(".tmp") or os.path.getsize(f"{run}/{f}") == 0], left
    assert not {"summary.json", "report.md", "COMPLETE"} & set(left), left
    assert _verify(f"{run}/checkpoints").returncode == 0
    logged = open(f"{run}/metrics.jsonl").read()
    os.remove(f"{small_disk}/msmoe_fault_fill")  # the user frees the space
    again = _run([*cmd, "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed 'full' at step 10" in again.stdout and "train full step" not in again.stdout  # no step trained
    summary = json.load(open(f"{run}/summary.json"))
    assert summary["steps"] == 10 and len(summary["loss_history"]) == 10 and 0 <= summary["map"] <= 1
    assert open(f"{run}/COMPLETE").read() == "10\n" and os.path.getsize(f"{run}/report.md") > 0
    assert open(f"{run}/metrics.jsonl").read() == logged

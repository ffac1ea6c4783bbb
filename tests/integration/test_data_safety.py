"""The dataset through the real command line: a user's folder at data.path is refused and kept,
two processes making one dataset at once share one generation, unreadable metadata is named."""

import fcntl
import os
import subprocess
import time

import pytest

from reid import dataset_dir
from reid.data import META_FILE, load_splits
from reid.synth import ensure_synth
from tests.helpers import ROOT, TINY_DATA, cli_command, cli_env, run_cli
from training.config import load_config


def _train_args(tmp, data_path, *extra):
    return ["--config", "configs/tiny.yaml", "--no-progress", "name=d", f"out_dir={tmp}/runs", f"data.path={data_path}",
            f"data.synth={TINY_DATA}", "train.steps=2", "eval.untrained=false", *extra]


def _tree(folder) -> dict:
    out = {}
    for base, _, files in os.walk(folder):
        for f in files:
            out[os.path.relpath(os.path.join(base, f), folder)] = open(os.path.join(base, f), "rb").read()
    return out


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_msmoe_train_refuses_a_users_folder_at_data_path_and_keeps_its_files(tmp_path, nproc):
    user = tmp_path / "my_photos"
    (user / "2024").mkdir(parents=True)
    (user / "2024" / "beach.jpg").write_bytes(b"\xff\xd8 holiday")
    (user / "todo.txt").write_text("back these up")
    before = _tree(user)
    proc = run_cli("train", "--nproc", nproc, *_train_args(tmp_path, user), timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("msmoe: error:") == 1, proc.stderr[-3000:]
    assert f"data.path={str(user)!r} holds 2024/, todo.txt and no {META_FILE}" in proc.stderr, proc.stderr[-3000:]
    assert "Set data.path to a new or empty folder" in proc.stderr
    assert _tree(user) == before and sorted(os.listdir(user)) == ["2024", "todo.txt"]


@pytest.mark.slow
def test_two_processes_making_one_dataset_at_once_share_one_generation(tmp_path):
    out = str(tmp_path / "data" / "synth_tiny")
    os.makedirs(os.path.dirname(out))
    cmd = cli_command("data", "synth", "--config", "configs/tiny.yaml", "--out", out)
    logs = [tmp_path / f"err{i}.txt" for i in range(2)]
    with open(dataset_dir.lock_path(out), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # both start while a writer holds the lock: they overlap for sure
        lock.write("PID 0 on the test\n")
        lock.flush()
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, cwd=ROOT,
                                  env=cli_env()) for log in logs]
        t0 = time.monotonic()
        while not all("msmoe: waiting for PID 0 on the test" in log.read_text() for log in logs):
            assert time.monotonic() - t0 < 120 and all(p.poll() is None for p in procs), \
                [log.read_text()[-2000:] for log in logs]  # before: no lock, both wrote at once and crashed
            time.sleep(0.2)
        fcntl.flock(lock, fcntl.LOCK_UN)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()[-3000:]
        assert f"which is writing the dataset {out}" in log.read_text()
    assert sorted(o.split(" ", 1)[0] for o in outputs) == ["already", "generated"], outputs  # one generation, shared
    assert [len(load_splits(out)[s]) for s in ("train", "query", "gallery")] == [216, 24, 48]
    assert sorted(os.listdir(os.path.dirname(out))) == [".synth_tiny.msmoe-lock", "synth_tiny"]  # no temp left


def test_garbage_dataset_metadata_is_named_with_a_fix_that_works(tmp_path):
    data = str(tmp_path / "data")
    assert ensure_synth(data, load_config(os.path.join(ROOT, "configs", "tiny.yaml")).data.synth_spec(), progress=False)
    with open(os.path.join(data, META_FILE), "w") as fh:
        fh.write("{ this is not json")
    meta = os.path.join(data, META_FILE)
    for args in (["data", "synth", "--config", "configs/tiny.yaml", "--out", data],
                 ["train", "--nproc", "2", *_train_args(tmp_path, data, "data.source=disk")],
                 ["train", *_train_args(tmp_path, data)]):
        proc = run_cli(*args, timeout=600)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and proc.stderr.count("msmoe: error:") == 1, proc.stderr[-3000:]
        assert f"the dataset's metadata {meta} is unreadable (JSONDecodeError: Expecting property name enclosed " \
               f"in double quotes: line 1 column 3" in proc.stderr, proc.stderr[-3000:]
        assert f"`msmoe data synth --force --out {data}`" in proc.stderr
    fixed = run_cli("data", "synth", "--force", "--config", "configs/tiny.yaml", "--out", data)
    assert fixed.returncode == 0 and fixed.stdout.startswith(f"generated {data}"), fixed.stderr[-3000:]

"""Dataset directories (reid/dataset_dir.py) with a real writer process: a killed writer holds nobody
up, and only its own leftovers are cleared."""

import fcntl
import os
import signal
import subprocess
import sys

import pytest

from reid import dataset_dir
from reid.data import load_splits
from reid.synth import SynthSpec, ensure_synth
from tests.helpers import ROOT, cli_env

TINY = SynthSpec(num_train_ids=2, num_test_ids=1, num_cameras=2, images_per_camera=2, height=32, width=16)


def _hold_the_lock_in_a_process(out: str) -> tuple[subprocess.Popen, str]:
    """A real process that takes the write lock and starts writing a temp dir, then sleeps."""
    code = ("import os, sys, time\nfrom reid import dataset_dir\n"
            "with dataset_dir.writer_lock(sys.argv[1]):\n"
            "    tmp = dataset_dir.new_temp_dir(sys.argv[1])\n"
            "    os.makedirs(os.path.join(tmp, '_cache', 'generator'))\n"
            "    open(os.path.join(tmp, '_cache', 'generator', 'part.arrow'), 'wb').write(b'half')\n"
            "    print(tmp, flush=True)\n"
            "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, out], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=cli_env())
    return proc, proc.stdout.readline().strip()


def test_a_killed_writer_holds_nobody_up_and_only_its_own_leftovers_go(tmp_path):
    out = str(tmp_path / "set")
    proc, tmp = _hold_the_lock_in_a_process(out)
    assert os.path.isdir(tmp) and os.path.basename(tmp).startswith(".set.msmoe-tmp-")
    with open(dataset_dir.lock_path(out)) as fh:  # held while it lives ...
        with pytest.raises(BlockingIOError):
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert f"PID {proc.pid} on " in fh.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with open(dataset_dir.lock_path(out)) as fh:  # ... and released by the kernel when it dies
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fh, fcntl.LOCK_UN)
    lookalike = tmp_path / ".set.msmoe-tmp-1-0123456789ab"  # msmoe's name, the user's files: kept
    lookalike.mkdir()
    (lookalike / "diary.txt").write_text("mine")
    (tmp_path / "set.partial").mkdir()  # not of this pattern: kept
    said = []
    assert dataset_dir.clear_leftovers(out, say=said.append) == [tmp]
    assert "removed 1 unfinished dataset write(s)" in said[0]
    _hold_the_lock_in_a_process(out)[0].kill()  # a second killed write: cleared by the next generation
    assert ensure_synth(out, TINY, progress=False)
    assert sorted(os.listdir(tmp_path)) == [".set.msmoe-lock", ".set.msmoe-tmp-1-0123456789ab", "set", "set.partial"]
    assert (lookalike / "diary.txt").read_text() == "mine"
    assert len(load_splits(out)["query"]) == 2

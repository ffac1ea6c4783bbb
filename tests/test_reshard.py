"""`msmoe convert` to another EP size carries the optimizer state: save at EP=2 on 2 ranks,
convert, load at EP=1 on 1 rank and at EP=4 on 4 ranks -> the same outputs, and the next
training step gives the same loss and weights as continuing at EP=2."""

import os
import subprocess
import sys

import pytest

from distributed import ROOT, run_torchrun


@pytest.mark.slow
def test_reshard_ep2_to_ep1_and_ep4(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_torchrun("ds_reshard_check.py", 2, ["--phase", "save", "--ckpt", ckpt], str(tmp_path / "save"))
    for ep in (1, 4):
        out = str(tmp_path / f"ep{ep}_ckpt")
        proc = subprocess.run([sys.executable, "-m", "launcher.cli", "convert", "--src", ckpt, "--out", out,
                               "--ep-size", str(ep)], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"EP 2 -> {ep}" in proc.stdout
        files = sorted(os.listdir(os.path.join(out, "s3")))
        assert [f for f in files if f.startswith("expp_rank_")] == [f"expp_rank_{r}_mp_rank_00_optim_states.pt"
                                                                     for r in range(ep)]
        reports, _ = run_torchrun("ds_reshard_check.py", ep, ["--phase", "load", "--ckpt", out],
                                  str(tmp_path / f"load{ep}"))
        for r in reports:
            assert r["ep_size"] == ep and r["same_names"]
            assert r["logits_err"] < 1e-6, r
            assert abs(r["loss"] - r["ref_loss"]) < 1e-6 * max(1, abs(r["ref_loss"])), r
            assert r["weights_err"] < 1e-5, r


@pytest.mark.slow
def test_reshard_refuses_bad_sizes(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_torchrun("ds_reshard_check.py", 2, ["--phase", "save", "--ckpt", ckpt], str(tmp_path / "save"))
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "convert", "--src", ckpt, "--out",
                           str(tmp_path / "x"), "--ep-size", "3"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode != 0 and "num_experts=4, not divisible by the new ep_size=3" in proc.stderr

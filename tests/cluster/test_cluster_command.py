"""``msmoe cluster`` (make cluster): as a plain user it refuses in one line, exit 2; as root a short run
on 2 emulated nodes writes runs/cluster-<transport> with its summary, prints the line per run and
leaves no namespace behind."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from cluster import netns
from tests.helpers import ROOT, cli_env, run_cli

TINY_RUN = ("train.steps=5", "train.log_every=1", "model.depth=2", "model.moe_blocks=[1]")  # 3 warm-up steps untimed


def test_refused_without_root_in_one_line(tmp_path):
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run the command as another user")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                           "launcher.cli", "cluster", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "msmoe: error: msmoe cluster builds network namespaces and shapes links with tc, which needs root "
        "(network namespaces and tc); run it as root (sudo make cluster) on a machine with iproute2")


@pytest.mark.slow
def test_a_short_run_on_two_nodes(netns_ready, tmp_path):
    out = str(tmp_path / "runs")
    proc = run_cli("cluster", "--out-dir", out, "--rate-mbit", "200", f"data.path={tmp_path}/data", *TINY_RUN,
                   timeout=600, check=True)
    lines = proc.stdout.splitlines()
    runs = [t for t in ("flat", "node_local") if os.path.isfile(f"{out}/cluster-{t}/summary.json")]
    assert "flat" in runs
    for t in runs:
        s = json.load(open(f"{out}/cluster-{t}/summary.json"))
        assert (s["world_size"], s["ep_size"], s["steps"]) == (4, 4, 5) and s["step_time_ms"]["step"] > 0
        assert any(line.startswith(f"  {t} ") and "world 4  EP 4" in line and "ms" in line for line in lines), lines
        assert os.path.getsize(f"{out}/cluster-logs/{t}/node1.log") > 0
    assert not [n for n in netns.list_namespaces() if n.startswith(netns.PREFIX_ROOT)]
    print("\n".join(lines[-2 * len(runs) - 1:]))

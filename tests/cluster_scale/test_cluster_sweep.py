"""``msmoe scale --cluster 1,2`` on a real emulated cluster (namespaces, tbf links, one torchrun agent
per node): every point's summary and JSON line carry the nodes, ranks per node, link rate and
cross-node bytes; the link model fitted on the points recovers the shaped rate; no namespace is left.
As a plain user the command is refused in one line (exit 2)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from cluster import netns
from scaling.cluster_fit import fit_links
from tests.helpers import ROOT, cli_env, run_cli

RATE_MBIT = 50.0
RATE_TOLERANCE = 0.30  # the fitted node link within +-30 % of the shaped rate


@pytest.mark.slow
def test_a_one_and_two_node_sweep_recovers_the_shaped_link(netns_ready, tmp_path):
    root = str(tmp_path / "runs")
    before = set(netns.list_namespaces())
    proc = run_cli("scale", "--cluster", "1,2", "--nproc-per-node", "2", "--link-mbit", str(RATE_MBIT),
                   "--ep", "1,4", "--steps", "10", "--placement-nodes", "0", "--run-root", root,
                   f"data.path={tmp_path}/data", timeout=420, check=True)
    assert "namespaces removed" in proc.stdout
    assert set(netns.list_namespaces()) <= before  # every cluster it built is gone
    recs = [json.loads(line) for line in open(f"{root}/points.jsonl")]
    got = {(r["nodes"], r["world_size"], r["ep_size"]) for r in recs}
    assert got == {(1, 2, 1), (1, 4, 1), (1, 4, 4), (2, 4, 1), (2, 4, 4)}  # each 2-node point has its 1-node twin
    for r in recs:
        s = json.load(open(f"{root}/{r['name']}/summary.json"))
        assert s["cluster"] == {**s["cluster"], "nodes": r["nodes"], "nproc_per_node": r["world_size"] // r["nodes"],
                                "link_mbit": RATE_MBIT}
        assert r["cluster"] == s["cluster"] and r["dense_params"] > 0 and "cross_node" in r["a2a_bytes_per_step"]
    by = {(r["nodes"], r["world_size"], r["ep_size"]): r for r in recs}
    assert by[(2, 4, 4)]["a2a_bytes_per_step"]["cross_node"] > 0  # rank 0 sends half its rows to node 1
    assert by[(1, 4, 4)]["a2a_bytes_per_step"]["cross_node"] == 0  # the twin: all four ranks on one node
    fit = fit_links(recs)
    print(f"fitted node link {fit.links.node_link_mbit:.1f} Mbit/s, shaped {RATE_MBIT:g}")
    assert fit.shaped_mbit == RATE_MBIT
    assert fit.links.node_link_mbit == pytest.approx(RATE_MBIT, rel=RATE_TOLERANCE)


def test_refused_without_root_in_one_line(tmp_path):
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run the command as another user")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                           "launcher.cli", "scale", "--cluster", "1,2", "--run-root", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("msmoe: error: msmoe scale --cluster builds network namespaces and shapes links with tc, "
                           "which needs root"), last

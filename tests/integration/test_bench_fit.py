"""msmoe fit (bench/fit.py): the toy regression learns."""

import json

from tests.helpers import run_cli


def test_fit_learns(tmp_path):
    out = run_cli("fit", "--steps", "60", "--quiet", "--out", str(tmp_path), "--name", "t", threads=None,
                  timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["final_mse"] < 0.7 * summary["initial_mse"]
    assert len(summary["last_routing"]["load"]) == 8

"""msmoe bench ep (bench/ep.py): all-to-all bytes against the analytic minimum."""

import json

import pytest

from tests.helpers import run_cli


@pytest.mark.slow
def test_bench_ep_bytes_match_the_analytic_minimum(tmp_path):
    js = tmp_path / "ep.json"
    out = run_cli("bench", "ep", "--nproc", "2", "--ep-sizes", "1,2", "--steps", "2", "--warmup", "1",
                  "--size", "8", "--batch", "2", "--dim", "16", "--hidden", "32", "--json", str(js), threads=None,
                  timeout=300)
    assert out.returncode == 0, out.stderr
    one, two = json.loads(js.read_text())
    assert one["ep_size"] == 1 and one["bytes_per_step_total"] == 0  # local experts: nothing sent
    assert two["bytes_per_step_total"] == two["analytic_min_bytes"] > 0
    assert 0 < two["bytes_per_step_offrank"] < two["bytes_per_step_total"]
    assert all(two["ms"][k] > 0 for k in ("route", "dispatch", "experts", "combine", "backward"))

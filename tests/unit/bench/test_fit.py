"""bench/fit.py in process: the toy regression (a student PatchMoE fitting a teacher) learns, and a
seed fixes the whole run. The command line around it is tests/integration/test_bench_fit.py."""

import json

from bench.fit import FitSpec, run_fit


def test_the_student_learns_and_the_seed_fixes_the_run(tmp_path):
    spec = FitSpec(steps=40, batch=4, size=8, dim=16, experts=4, quiet=True, out=str(tmp_path), name="a")
    first = run_fit(spec)
    assert first["final_mse"] < 0.8 * first["initial_mse"]
    assert sum(first["last_routing"]["load"]) > 0 and len(first["last_routing"]["load"]) == 4
    again = run_fit(FitSpec(**{**first["config"], "name": "b"}))
    assert again["mse_history"] == first["mse_history"]  # same seed: the same draws, the same steps
    other = run_fit(FitSpec(**{**first["config"], "name": "c", "seed": 1}))
    assert other["mse_history"] != first["mse_history"]
    written = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert written["mse_history"] == first["mse_history"] and written["config"]["steps"] == 40

"""The test helpers' child processes keep the caller's PYTHONPATH entries (parallel/launchenv.py:
with_on_path, through tests/helpers.py: cli_env)."""

import subprocess
import sys

from tests.helpers import cli_env


def test_a_child_started_by_the_test_helpers_still_sees_the_callers_packages(tmp_path, monkeypatch):
    """On the GPU node the bundle (deepspeed, datasets) is on PYTHONPATH only: a test's child
    process that replaced PYTHONPATH with the project root would not find it."""
    (tmp_path / "bundle_probe.py").write_text("WHERE = 'bundle'\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    from tests.helpers import cli_env

    code = "import bundle_probe, parallel.launchenv; print(bundle_probe.WHERE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=cli_env())
    assert out.returncode == 0 and out.stdout.strip() == "bundle", out.stderr

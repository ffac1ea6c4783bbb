"""The msmoe command line (launcher/cli.py): its subcommands."""

from tests.helpers import run_cli


def test_help_lists_subcommands():
    out = run_cli("--help", threads=None, timeout=300)
    assert out.returncode == 0
    for cmd in ("bench", "fit", "train", "eval", "data"):
        assert cmd in out.stdout
    assert "layer" in run_cli("bench", "--help", threads=None, timeout=300).stdout

"""The msmoe command line (launcher/cli.py): its subcommands."""

from tests.helpers import run_cli


def test_help_lists_subcommands():
    out = run_cli("--help", threads=None, timeout=300)
    assert out.returncode == 0
    for cmd in ("bench", "fit", "train", "eval", "data"):
        assert cmd in out.stdout
    assert "layer" in run_cli("bench", "--help", threads=None, timeout=300).stdout


def test_a_user_error_exits_2_with_its_message(monkeypatch, capsys):
    """Any UserError subclass raised in a command (one the CLI has never heard of): one line, exit 2."""
    import argparse

    from common.errors import UserError
    from launcher import cli

    class BrandNewError(UserError, ValueError):
        pass

    def command(args):
        raise BrandNewError("widgets=3 must be even: set widgets=4")

    def parser():
        p = argparse.ArgumentParser(prog="msmoe")
        sub = p.add_subparsers(dest="command")
        sub.add_parser("widget").set_defaults(func=command)
        return p

    for var in ("RANK", "MSMOE_WORKER_ERRORS", "MSMOE_WORKER_EXITS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main(["widget"]) == 2
    assert capsys.readouterr().err == "msmoe: error: widgets=3 must be even: set widgets=4\n"

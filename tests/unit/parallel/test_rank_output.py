"""Non-zero ranks' output lines carry their rank (parallel/rank_output.py)."""

import io
import logging
import sys

from parallel.rank_output import PrefixedStream, launcher_rank, prefix_rank_output


def test_every_line_start_gets_the_prefix_once():
    inner = io.StringIO()
    s = PrefixedStream(inner, "[rank 1] ")
    s.write("a")
    s.write("b\nc\n")
    s.write("")
    s.writelines(["d\n\n", "e"])
    assert inner.getvalue() == "[rank 1] ab\n[rank 1] c\n[rank 1] d\n[rank 1] \n[rank 1] e"


def test_prefix_rank_output_wraps_stdout_stderr_and_their_log_handlers(monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    logger = logging.getLogger("msmoe-test-rank-output")
    handler = logging.StreamHandler(out)
    logger.addHandler(handler)
    try:
        prefix_rank_output(0)
        assert sys.stdout is out  # rank 0 writes plain lines
        prefix_rank_output(2)
        prefix_rank_output(2)  # idempotent
        print("hello")
        print("oops", file=sys.stderr)
        logger.warning("from a logger")
    finally:
        logger.removeHandler(handler)
    assert out.getvalue() == "[rank 2] hello\n[rank 2] from a logger\n"
    assert err.getvalue() == "[rank 2] oops\n"


def test_launcher_rank(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert launcher_rank() == 3
    monkeypatch.delenv("RANK")
    assert launcher_rank() == 0

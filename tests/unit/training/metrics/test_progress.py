"""The rank-0 progress display (training/metrics/progress.py): a plain line per logging step when stdout is
not a terminal, the bar on one, and the command line's override."""

import io

import pytest

from launcher.train import progress_choice
from training.job import display_mode
from training.metrics.records import StepResult
from training.metrics.progress import NoProgress, ProgressBar, ProgressLines, build_progress, format_eta, progress_line


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_auto_is_the_bar_on_a_terminal_and_lines_elsewhere():
    assert display_mode("auto", _Tty()) == "bar" and display_mode("auto", io.StringIO()) == "lines"
    assert display_mode("bar", io.StringIO()) == "bar" and display_mode("lines", _Tty()) == "lines"
    assert [progress_choice(f) for f in (None, True, False)] == ["auto", "bar", "lines"]


def test_cli_progress_flags():
    from launcher.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["train"]).progress is None
    assert parse(["train", "--progress"]).progress is True and parse(["train", "--no-progress"]).progress is False


def test_progress_line(capsys):
    rec = {"step": 40, "loss": {"total": 3.14159, "id": 2.5, "triplet": 0.61, "aux": None}, "lr": 0.00125,
           "samples_per_s": 123.456, "eta_s": 3725.4}
    assert progress_line("tiny", 600, rec) == ("train tiny step 40/600  loss 3.1416 (id 2.5000 tri 0.6100 aux nan)  "
                                               "lr 0.00125  123.5 samples/s  ETA 1:02:05")
    lines = build_progress("lines", "tiny", 0, 600)
    assert isinstance(lines, ProgressLines)
    lines.update(StepResult(False, 1.0, 1.0, 0.0, 0.0, 1.0, False), 1.0)  # nothing per step
    lines.logged(rec)
    out = capsys.readouterr().out
    assert out == progress_line("tiny", 600, rec) + "\n"
    assert format_eta(59.6) == "0:01:00" and format_eta(-1) == "0:00:00"
    assert isinstance(build_progress("off", "t", 0, 1), NoProgress)
    bar = build_progress("bar", "t", 0, 1)
    assert isinstance(bar, ProgressBar)
    bar.close()
    with pytest.raises(ValueError, match="progress mode 'fancy'"):
        build_progress("fancy", "t", 0, 1)

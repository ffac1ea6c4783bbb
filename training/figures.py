"""Matplotlib for reports (Agg backend, imported on first use) and the switch that leaves a run
report's PNG plots out.

``MSMOE_REPORT_PLOTS=0`` in the environment: runs write ``report.md`` (tables, figures in text)
without drawing its plots, which saves about a second per run (matplotlib's import and the
figures); for sweeps of many small runs and the test suite. Scaling and ablation reports always
draw theirs.
"""

from __future__ import annotations

import functools
import os

PLOTS_ENV = "MSMOE_REPORT_PLOTS"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots_wanted() -> bool:
    return os.environ.get(PLOTS_ENV, "1") != "0"


def run_plot(fn):
    """A run report's plot function ``fn(..., path)``: does nothing when the plots are switched off."""

    @functools.wraps(fn)
    def draw(*args, **kwargs):
        if plots_wanted():
            fn(*args, **kwargs)

    return draw

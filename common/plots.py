"""Matplotlib for reports (Agg backend, imported on first use), the atomic PNG writer every run
plot goes through (:func:`save_figure`), and the switch that leaves a run report's PNG plots out.

``MSMOE_REPORT_PLOTS=0`` in the environment: runs write ``report.md`` (tables, figures in text)
without drawing its plots, which saves about a second per run (matplotlib's import and the
figures); for sweeps of many small runs and the test suite. Scaling and ablation reports always
draw theirs.
"""

from __future__ import annotations

import functools
import os

from common.files import atomic_file

PLOTS_ENV = "MSMOE_REPORT_PLOTS"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, **kwargs) -> None:
    """``fig`` as a PNG at ``path``, written atomically (common/files.py: a full disk leaves the old
    plot or none, never a cut one), then closed."""
    try:
        with atomic_file(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110, **kwargs)
    finally:
        pyplot().close(fig)


def plots_wanted() -> bool:
    return os.environ.get(PLOTS_ENV, "1") != "0"


def run_plot(fn):
    """A run report's plot function ``fn(..., path)``: does nothing when the plots are switched off."""

    @functools.wraps(fn)
    def draw(*args, **kwargs):
        if plots_wanted():
            fn(*args, **kwargs)

    return draw

"""The tiny run the unit tests of the trainer and the job train in this process (no subprocess, no
torchrun; the world-1 process group is conftest.py's ``world1``)."""

from __future__ import annotations

import os

from tests.helpers import ROOT, TINY_DATA


def tiny_overrides(out_dir: str, data_dir: str, **train) -> list[str]:
    """configs/tiny.yaml's run under ``out_dir`` on the synthetic set in ``data_dir`` (made when
    missing); ``train`` sets train.* fields."""
    fields = {"steps": 6, "log_every": 2, "ckpt_every": 3, "keep_last": 5, "threads": 1, **train}
    return [f"out_dir={out_dir}", f"data.path={data_dir}", f"data.synth={TINY_DATA}",
            "eval.untrained=false", *[f"train.{k}={v}" for k, v in fields.items()]]


TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")

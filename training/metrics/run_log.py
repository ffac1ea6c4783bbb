"""What a run writes at every logging step, rank 0 only (the trainer hands the other ranks
:class:`NoRunLog`):

  runs/<name>/metrics.jsonl    one JSON object per logging step (training/metrics/interval.py: interval_record)
  runs/<name>/tensorboard/     TensorBoard event files: every number of the record as a scalar
                               (nested keys joined by '/': loss/total, expert_load/block1/3, ...) and
                               the expert-load heatmap (layers x experts) as the image ``expert_load``
  Weights & Biases             the same scalars, only when ``train.wandb_project`` is set; the wandb
                               package is then required (:func:`check_wandb` stops the run before it
                               starts, naming the fix), never otherwise

  tensorboard --logdir runs/<name>/tensorboard

A resumed run continues the files: metrics.jsonl keeps the lines up to the step it resumes from
(later ones, written after that checkpoint, are dropped) and the TensorBoard writer purges events
from the step after it (``purge_step``), so no step appears twice. A run started afresh in the same
directory starts both over the same way (resume step 0).
"""

from __future__ import annotations

import importlib
import json
import math
import os

import numpy as np

from common.config import ConfigError
from common.files import write_text_atomic

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"
HEATMAP_CELL_PX = 12  # each (layer, expert) cell of the heatmap image is a square of this many pixels


def check_wandb(project: str) -> None:
    """``train.wandb_project`` set without the wandb package: one-line ConfigError with the fix."""
    if not project:
        return
    try:
        importlib.import_module("wandb")
    except ImportError:
        raise ConfigError(f"train.wandb_project={project!r} needs the wandb package, which is not installed: "
                          "`.venv/bin/pip install wandb` (and `wandb login`), or leave train.wandb_project empty") \
            from None


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """Every number of a nested record, keyed by its path joined with '/' (list items by index);
    None (a skipped step's NaN loss in JSON) becomes NaN."""
    out: dict[str, float] = {}
    items = record.items() if isinstance(record, dict) else enumerate(record)
    for key, value in items:
        tag = f"{prefix}{key}"
        if isinstance(value, (dict, list, tuple)):
            out.update(flatten(value, tag + "/"))
        elif value is None:
            out[tag] = math.nan
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a cut-off last line (a crash mid-write) is left out."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                out.append(rec)
    return out


def keep_until(path: str, step: int) -> int:
    """Rewrite metrics.jsonl with only its records of steps <= ``step`` (atomically); returns how many."""
    if not os.path.isfile(path):
        return 0
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
    return len(kept)


def load_heatmap(load: dict[str, list[float]], cell: int = HEATMAP_CELL_PX) -> np.ndarray:
    """[H, W, 3] uint8 image of the expert load: one row per layer, one column per expert, colour =
    the expert's share of the layer's patches over an even share (viridis: 0 dark, 1 = even
    in the middle, >= 2 yellow); layers with fewer experts are padded dark."""
    from matplotlib import colormaps

    rows = list(load.values())
    experts = max((len(r) for r in rows), default=0)
    share = np.zeros((max(len(rows), 1), max(experts, 1)))
    for i, r in enumerate(rows):
        if r:
            share[i, : len(r)] = np.asarray(r, dtype=float) * len(r)
    rgb = colormaps["viridis"](np.clip(np.nan_to_num(share) / 2, 0, 1))[..., :3]
    return (np.repeat(np.repeat(rgb, cell, 0), cell, 1) * 255).astype(np.uint8)


class RunLog:
    """Rank 0's metrics writers, opened when training starts at ``start_step`` (0, or the resumed step)."""

    def __init__(self, run_dir: str, start_step: int, *, wandb_project: str = "", run_name: str = "",
                 run_id: str = "", config: dict | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, METRICS_FILE)
        keep_until(self.path, start_step)
        self.fh = open(self.path, "a")
        # events of steps > start_step in older event files (written after the checkpoint) are purged
        self.tb = SummaryWriter(os.path.join(run_dir, TB_DIR), purge_step=start_step + 1)
        self.wandb = None
        if wandb_project:
            check_wandb(wandb_project)
            import wandb

            self.wandb = wandb.init(project=wandb_project, name=run_name, id=run_id or None, resume="allow",
                                    config=config)

    def write(self, record: dict) -> None:
        """One logging step's record (``record["step"]``) to every writer."""
        from training.metrics.records import finite_or_null

        step = record["step"]
        self.fh.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")
        self.fh.flush()
        scalars = {k: v for k, v in flatten(record).items() if k != "step"}
        for tag, value in scalars.items():
            self.tb.add_scalar(tag, value, step)
        if record.get("expert_load"):
            self.tb.add_image("expert_load", load_heatmap(record["expert_load"]), step, dataformats="HWC")
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.fh.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class NoRunLog:
    """Ranks other than 0: nothing is written."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass

"""An exported model: one ``safetensors`` file with every weight (experts consolidated) and the
model's configuration, loadable on one process without DeepSpeed or a process group.

  model = load_exported("runs/default/model.safetensors")          # CPU, eval mode
  model = load_exported(path, device="cuda")
  out = model.net(batch)                                           # a reid.data.Batch -> ReIDOutput

Written by ``msmoe export`` (launcher/export.py). The file's metadata holds the model config
(``model``, as in the run's config.yaml), ``num_classes``, the image size the model was trained
on and where it came from (run, checkpoint tag).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from common.config import from_dict
from reid.config import ModelConfig
from reid.model import ReIDModel

FORMAT = "msmoe-reid-1"


@dataclass(frozen=True)
class ExportedModel:
    net: ReIDModel  # in eval mode
    image_size: tuple[int, int]  # (height, width) of the training images
    meta: dict  # everything the file's metadata says (run, tag, step, ...)


def save_exported(path: str, state: dict[str, torch.Tensor], model: dict, num_classes: int,
                  image_size: tuple[int, int], **meta) -> None:
    """Write ``state`` (a plain single-rank state dict) with its config; checks it builds first."""
    from safetensors.torch import save_file

    net = ReIDModel(from_dict(ModelConfig, model, "model"), num_classes)
    net.load_state_dict(state, strict=True)  # a file that would not load is never written
    info = {"format": FORMAT, "model": model, "num_classes": num_classes, "image_size": list(image_size), **meta}
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"msmoe": json.dumps(info)})


def load_exported(path: str, device: str | torch.device = "cpu") -> ExportedModel:
    """The model in ``path`` (written by ``msmoe export``), on ``device``, in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as fh:
        raw = (fh.metadata() or {}).get("msmoe")
    if raw is None:
        raise ValueError(f"{path} is not an msmoe export (no 'msmoe' metadata): make one with `msmoe export`")
    info = json.loads(raw)
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} has format {info.get('format')!r}; this msmoe reads {FORMAT!r}")
    net = ReIDModel(from_dict(ModelConfig, info["model"], "model"), int(info["num_classes"]))
    net.load_state_dict(load_file(path), strict=True)
    return ExportedModel(net.to(device).eval(), tuple(info["image_size"]), info)

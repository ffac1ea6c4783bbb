"""Retrieval features from a model on one process: for a dataset split (Arrow, as ``msmoe data``
writes it) or for a folder of images.

A folder holds one subfolder per modality - ``RGB/ NI/ TI/`` (the RGBNT201 layout) or
``rgb/ nir/ tir/`` - with the same file names in each; an image set is one name present in all
three. Images are resized to the model's training size (bilinear) and normalised as in training.
Features are the BNNeck outputs (what retrieval ranks by), fp32.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from reid.data import MODALITIES, Batch, DataError, chunks, fetch
from reid.rgbnt201 import read_image

FOLDER_NAMES = ({"rgb": "RGB", "nir": "NI", "tir": "TI"}, {m: m for m in MODALITIES})
EXTS = (".jpg", ".jpeg", ".png", ".bmp")


@torch.no_grad()
def _features(net, batches, device) -> np.ndarray:
    out = []
    for b in batches:
        out.append(net(b.to(device)).feat_bn.float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, net.cfg.dim), np.float32)


def embed_split(net, split, batch_size: int = 64, device="cpu") -> tuple[list[str], np.ndarray]:
    """(names, features [N, D]) of every record of a split, in order."""
    idx = list(range(len(split)))
    names = [str(n) for n in split["name"]] if "name" in split.column_names else [str(i) for i in idx]
    return names, _features(net, (fetch(split, part) for part in chunks(idx, batch_size)), device)


def folder_names(folder: str) -> tuple[dict[str, str], list[str]]:
    """The folder's modality subfolders and the image names present in all of them (sorted)."""
    for layout in FOLDER_NAMES:
        dirs = {m: os.path.join(folder, d) for m, d in layout.items()}
        if all(os.path.isdir(d) for d in dirs.values()):
            sets = [{f for f in os.listdir(d) if f.lower().endswith(EXTS)} for d in dirs.values()]
            names = sorted(set.intersection(*sets))
            if not names:
                raise DataError(f"{folder}: no image name is present in all of {sorted(dirs.values())}")
            return dirs, names
    raise DataError(f"{folder}: expected modality subfolders RGB/ NI/ TI/ (or rgb/ nir/ tir/) with the same "
                    "image names in each")


def _read(dirs: dict[str, str], names: list[str], height: int, width: int) -> Batch:
    images = {m: torch.from_numpy(np.stack([read_image(os.path.join(d, n), m, height, width) for n in names]))
              .float().div_(127.5).sub_(1.0) for m, d in dirs.items()}
    zeros = torch.zeros(len(names), dtype=torch.long)
    return Batch(images["rgb"], images["nir"], images["tir"], zeros, zeros)


def embed_folder(net, folder: str, image_size: tuple[int, int], batch_size: int = 64,
                 device="cpu") -> tuple[list[str], np.ndarray]:
    """(names, features [N, D]) of every image set in ``folder`` (see the module docstring)."""
    dirs, names = folder_names(folder)
    h, w = image_size
    return names, _features(net, (_read(dirs, part, h, w) for part in chunks(names, batch_size)), device)


def write_features(path: str, names: list[str], feats: np.ndarray) -> list[str]:
    """``.safetensors`` (names in its metadata) or ``.npy`` (+ ``<path>.names.txt``); returns the files."""
    if path.endswith(".safetensors"):
        import json

        from safetensors.numpy import save_file

        save_file({"features": np.ascontiguousarray(feats)}, path, metadata={"names": json.dumps(names)})
        return [path]
    if not path.endswith(".npy"):
        raise ValueError(f"--out {path}: use a .safetensors or .npy file name")
    np.save(path, feats)
    with open(path + ".names.txt", "w") as fh:
        fh.write("\n".join(names) + "\n")
    return [path, path + ".names.txt"]

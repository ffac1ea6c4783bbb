"""Importer for the real RGBNT201 folder layout into msmoe's Arrow storage.

  <root>/train_171/RGB/<name>.jpg   <root>/train_171/NI/<name>.jpg   <root>/train_171/TI/<name>.jpg
  <root>/test/RGB/...               <root>/test/NI/...               <root>/test/TI/...

A record is one file name present in all three modality folders; the name starts with the
person id and the camera: ``000123_cam2_...``. Following the RGBNT201 protocol the test set is
both the query and the gallery (the evaluation removes same-identity same-camera matches, the
query itself included). Images are resized to height x width (bilinear); NIR and TIR are read as
one channel.

Bad records - a modality missing, an unreadable file, modalities of different sizes, a name
without person/camera ids - raise :class:`DataError` naming the file (``on_bad="error"``), or are
skipped and counted (``on_bad="skip"``); the count and reasons go into the dataset's metadata.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from reid.data import DataError, write_dataset
from reid.dataset_dir import check_replaceable

MODALITY_DIRS = {"rgb": "RGB", "nir": "NI", "tir": "TI"}
SPLIT_DIRS = {"train": "train_171", "test": "test"}
NAME = re.compile(r"^(\d+)_cam(\d+)")
EXTS = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass
class ImportReport:
    records: dict = field(default_factory=dict)  # split -> number kept
    bad: list = field(default_factory=list)  # {"file", "reason"}


def _scan(split_dir: str, on_bad: str, report: ImportReport) -> list[tuple[str, int, int]]:
    """Validated records of one split: (file name, pid, camera index from 0)."""
    from PIL import Image

    names: dict[str, set] = {}
    for m, sub in MODALITY_DIRS.items():
        d = os.path.join(split_dir, sub)
        if not os.path.isdir(d):
            raise DataError(f"RGBNT201 layout: missing folder {d} (expected {sorted(MODALITY_DIRS.values())} "
                            f"under {split_dir})")
        for f in os.listdir(d):
            if f.lower().endswith(EXTS):
                names.setdefault(f, set()).add(m)
    good = []
    for name in sorted(names):
        problem, where = None, os.path.join(split_dir, MODALITY_DIRS["rgb"], name)
        missing = [MODALITY_DIRS[m] for m in MODALITY_DIRS if m not in names[name]]
        match = NAME.match(name)
        if missing:
            where = os.path.join(split_dir, missing[0], name)
            problem = f"missing modality {'/'.join(missing)}: {where} does not exist"
        elif match is None:
            problem = "file name does not start with <person id>_cam<camera>"
        else:
            sizes = {}
            for m, sub in MODALITY_DIRS.items():
                path = os.path.join(split_dir, sub, name)
                try:
                    with Image.open(path) as im:
                        im.load()
                        sizes[sub] = im.size
                except Exception as exc:  # PIL raises several types for broken files
                    where, problem = path, f"unreadable image ({type(exc).__name__}: {exc})"
                    break
            if problem is None and len(set(sizes.values())) > 1:
                problem = "modalities differ in size: " + ", ".join(f"{k} {w}x{h}" for k, (w, h) in sizes.items())
        if problem is not None:
            if on_bad == "error":
                raise DataError(f"bad RGBNT201 record {where}: {problem}. Fix or remove the file, or import with "
                                "--skip-bad to skip such records (they are counted)")
            report.bad.append({"file": where, "reason": problem})
            continue
        good.append((name, int(match.group(1)), int(match.group(2)) - 1))
    return good


def read_image(path: str, modality: str, height: int, width: int) -> np.ndarray:
    """One modality's image as uint8 [C, height, width] (RGB: 3 channels, NIR/TIR: 1), bilinear resize."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB" if modality == "rgb" else "L").resize((width, height), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
    return a.transpose(2, 0, 1).copy() if a.ndim == 3 else a[None].copy()


def _load(split_dir: str, name: str, height: int, width: int) -> dict[str, np.ndarray]:
    return {m: read_image(os.path.join(split_dir, sub, name), m, height, width) for m, sub in MODALITY_DIRS.items()}


def import_rgbnt201(src: str, out_dir: str, height: int = 128, width: int = 64, on_bad: str = "error",
                    progress: bool = True) -> ImportReport:
    from tqdm import tqdm

    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad={on_bad!r} must be 'error' or 'skip'")
    check_replaceable(out_dir, "--out")  # before the scan: a folder msmoe did not make is refused at once
    report = ImportReport()
    scanned = {}
    for split, sub in SPLIT_DIRS.items():
        d = os.path.join(src, sub)
        if not os.path.isdir(d):
            raise DataError(f"RGBNT201 layout: missing folder {d} (expected {list(SPLIT_DIRS.values())} under {src})")
        scanned[split] = _scan(d, on_bad, report)
        if not scanned[split]:
            raise DataError(f"no usable records under {d}")
        report.records[split] = len(scanned[split])

    def maker(split: str):
        d = os.path.join(src, SPLIT_DIRS[split])

        def gen():
            for name, pid, cam in tqdm(scanned[split], desc=f"import {split}", disable=not progress, leave=False):
                yield {**_load(d, name, height, width), "pid": pid, "camid": cam, "name": name}
        return gen

    meta = {"kind": "rgbnt201", "src": os.path.abspath(src), "height": height, "width": width,
            "records": report.records, "skipped": len(report.bad), "bad": report.bad}
    write_dataset(out_dir, {"train": maker("train"), "query": maker("test"), "gallery": maker("test")},
                  height, width, meta, field="--out")
    return report

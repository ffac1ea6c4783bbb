"""ReID data on disk and in batches.

Storage: a Hugging Face ``datasets.DatasetDict`` saved with ``save_to_disk`` (Arrow files,
memory-mapped on load) with splits ``train``, ``query``, ``gallery`` and columns
  rgb [3, H, W] uint8, nir [1, H, W] uint8, tir [1, H, W] uint8, pid int32, camid int32, name str
plus ``msmoe_data.json`` (what made it), written last into a temp dir that is then renamed into
place (reid/dataset_dir.py): a directory without it is not a dataset and is never read; one that is
not msmoe's own is never replaced.

Batches: :class:`PKSampler` draws, for each step, P identities x K images as one global batch
from (seed, step) alone - so a resumed run sees exactly the batches an uninterrupted one would -
and gives rank r the identities r*P/W .. (r+1)*P/W - 1 (each rank's slice holds whole
identities, so batch-hard triplets have positives on every rank). Evaluation splits are
sharded by :func:`eval_shard`: equal-length index lists per rank (padded by repetition; the
padding is masked out when features are gathered).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from common.errors import UserError

SPLITS = ("train", "query", "gallery")
MODALITIES = {"rgb": 3, "nir": 1, "tir": 1}
META_FILE = "msmoe_data.json"


class DataError(UserError, ValueError):
    """Bad data or data settings; the message names the file/field and the fix."""


def features(height: int, width: int):
    from datasets import Array3D, Features, Value

    cols = {m: Array3D(shape=(c, height, width), dtype="uint8") for m, c in MODALITIES.items()}
    cols.update(pid=Value("int32"), camid=Value("int32"), name=Value("string"))
    return Features(cols)


def write_dataset(out_dir: str, split_records: dict[str, Callable[[], Iterable[dict]]], height: int, width: int,
                  meta: dict, num_shards: int = 2, field: str = "data.path", reuse: bool = False) -> bool:
    """Write the splits to ``out_dir`` as Arrow, ``meta`` last; True when it wrote.

    ``split_records`` maps a split name to a zero-argument function yielding its records. One writer
    at a time, into a temp dir renamed into place; an existing ``out_dir`` is replaced only if msmoe
    made it (reid/dataset_dir.py; ``field`` names the setting in the refusal). ``reuse``: keep a set
    with this very ``meta`` that is there once the lock is held (another process made it meanwhile).
    """
    import datasets
    from datasets import Dataset, DatasetDict

    from reid import dataset_dir

    datasets.disable_progress_bars()  # our own bar reports progress
    with dataset_dir.writer_lock(out_dir):
        if reuse and read_meta(out_dir) == meta:
            return False
        dataset_dir.check_replaceable(out_dir, field)
        dataset_dir.clear_leftovers(out_dir)
        tmp = dataset_dir.new_temp_dir(out_dir)
        feats = features(height, width)
        parts = {}
        for split, recs in split_records.items():
            parts[split] = Dataset.from_generator(
                _records_gen, gen_kwargs={"make": recs}, features=feats,
                cache_dir=os.path.join(tmp, "_cache"), keep_in_memory=False,
            )
        dd = DatasetDict(parts)
        dd.save_to_disk(os.path.join(tmp, "arrow"),
                        num_shards={k: min(num_shards, max(1, len(v))) for k, v in parts.items()})
        del dd, parts
        shutil.rmtree(os.path.join(tmp, "_cache"), ignore_errors=True)
        with open(os.path.join(tmp, META_FILE), "w") as fh:
            json.dump(meta, fh, indent=1)
        dataset_dir.publish(tmp, out_dir, field)
    return True


def _records_gen(make):
    yield from make()


def read_meta(data_dir: str) -> dict | None:
    """The dataset's ``msmoe_data.json``; None when there is none. Unreadable: DataError naming the file."""
    path = os.path.join(data_dir, META_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as fh:
            meta = json.loads(fh.read().decode("utf-8"))
        problem = None if isinstance(meta, dict) else f"it holds a JSON {type(meta).__name__}, not an object"
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        raise DataError(f"the dataset's metadata {path} is unreadable ({problem}): the set in {data_dir!r} is "
                        f"damaged; make it again with `msmoe data synth --force --out {data_dir}` (for data.source="
                        f"synth) or `msmoe data rgbnt201 --src <RGBNT201 folder> --out {data_dir}`")
    return meta


def load_splits(data_dir: str):
    """The memory-mapped splits, formatted as numpy."""
    from datasets import load_from_disk

    if read_meta(data_dir) is None:
        raise DataError(
            f"no msmoe dataset at {data_dir!r} (missing {META_FILE}); make it with "
            f"`msmoe data synth --out {data_dir}` or `msmoe data rgbnt201 --src <RGBNT201 folder> --out {data_dir}`"
        )
    dd = load_from_disk(os.path.join(data_dir, "arrow"))
    missing = [s for s in SPLITS if s not in dd]
    if missing:
        raise DataError(f"dataset {data_dir!r} lacks split(s) {missing}")
    splits = {s: dd[s].with_format("numpy") for s in SPLITS}
    check_layout(splits, data_dir)
    return splits


def image_size(splits) -> tuple[int, int]:
    """(H, W) shared by every modality and split (checked by :func:`check_layout`)."""
    shape = splits["train"].features["rgb"].shape
    return int(shape[1]), int(shape[2])


def check_image_size(splits, data_dir: str, stem_stride: int) -> None:
    """The images' height and width divide by the model's stem stride."""
    h, w = image_size(splits)
    if h % stem_stride or w % stem_stride:
        raise DataError(f"images of {h}x{w} in {data_dir!r} do not divide by model.stem_stride={stem_stride}: "
                        f"use a stride that divides both, or data of another size")


def check_layout(splits, data_dir: str) -> None:
    """Every split holds rgb/nir/tir images with 3/1/1 channels of one size, and pid/camid columns."""
    sizes = {}
    for split, ds in splits.items():
        for col in (*MODALITIES, "pid", "camid"):
            if col not in ds.features:
                raise DataError(f"dataset {data_dir!r}, split {split!r}: no column {col!r} "
                                f"(has {sorted(ds.features)}); re-import it with `msmoe data`")
        for m, channels in MODALITIES.items():
            shape = tuple(getattr(ds.features[m], "shape", ()) or ())
            if len(shape) != 3 or shape[0] != channels:
                raise DataError(f"dataset {data_dir!r}, split {split!r}: {m} images have shape {shape}, expected "
                                f"({channels}, H, W) - RGB 3 channels, NIR 1, TIR 1; re-import the data")
            sizes[(split, m)] = shape[1:]
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{s}/{m} {h}x{w}" for (s, m), (h, w) in sizes.items())
        raise DataError(f"dataset {data_dir!r}: images differ in size across modalities or splits ({listed}); "
                        "all must share one H x W")


@dataclass(frozen=True)
class Batch:
    """Images normalised to [-1, 1]: rgb [B,3,H,W], nir [B,1,H,W], tir [B,1,H,W]; pid, camid [B]."""

    rgb: torch.Tensor
    nir: torch.Tensor
    tir: torch.Tensor
    pid: torch.Tensor
    camid: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """``non_blocking``: an asynchronous copy (overlaps with the host) when the source is pinned."""
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.rgb, self.nir, self.tir, self.pid,
                                                                           self.camid)))

    def __len__(self) -> int:
        return self.pid.shape[0]


def _rows(split, indices: list[int]) -> dict[str, np.ndarray]:
    """Columns of rows ``indices`` as numpy, read straight from the memory-mapped Arrow table
    (the generic ``datasets`` formatter is ~10x slower for image arrays)."""
    import pyarrow as pa

    if getattr(split, "_indices", None) is not None:  # a selected/shuffled view: generic path
        return split[list(indices)]
    table = split.data.table
    take = pa.array(np.asarray(indices, dtype=np.int64))
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name).take(take).combine_chunks()
        if name in MODALITIES:
            shape = split.features[name].shape
            flat = col.storage
            for _ in shape:
                flat = flat.flatten()
            out[name] = flat.to_numpy(zero_copy_only=False).reshape(len(indices), *shape)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def fetch(split, indices: list[int], flip: np.ndarray | None = None) -> Batch:
    """Read rows ``indices`` of a split into a :class:`Batch` (optionally mirroring some)."""
    rows = _rows(split, indices)
    out = {}
    for m in MODALITIES:
        if rows[m].dtype.kind == "f" and not np.isfinite(rows[m]).all():
            bad = np.nonzero(~np.isfinite(rows[m].reshape(len(indices), -1)).all(1))[0]
            names = [str(rows["name"][i]) if "name" in rows else str(indices[i]) for i in bad[:5]]
            raise DataError(f"non-finite pixels (NaN/inf) in the {m} image(s) {names}"
                            f"{' and more' if len(bad) > 5 else ''}: fix or drop those records and re-import")
        x = torch.from_numpy(np.require(rows[m], requirements=["C", "W"])).float().div_(127.5).sub_(1.0)
        if flip is not None and flip.any():
            sel = torch.from_numpy(np.asarray(flip, dtype=bool))
            x[sel] = x[sel].flip(-1)
        out[m] = x
    return Batch(out["rgb"], out["nir"], out["tir"],
                 torch.from_numpy(rows["pid"].astype(np.int64)), torch.from_numpy(rows["camid"].astype(np.int64)))


class PKSampler:
    """P identities x K images per global batch, split by identity across ``world_size`` ranks.

    ``indices(step)`` depends only on (seed, step, rank): resuming at step s continues exactly.
    An identity with fewer than K images is sampled with replacement.
    """

    def __init__(self, pids: np.ndarray, p: int, k: int, world_size: int, rank: int, seed: int):
        if p % world_size:
            raise DataError(f"train.p={p} identities per batch is not divisible by the world size {world_size}; "
                            f"choose p as a multiple of {world_size}")
        self.pids = np.asarray(pids)
        self.by_pid: dict[int, np.ndarray] = {}
        order = np.argsort(self.pids, kind="stable")
        ids, starts = np.unique(self.pids[order], return_index=True)
        for i, pid in enumerate(ids):
            end = starts[i + 1] if i + 1 < len(ids) else len(order)
            self.by_pid[int(pid)] = order[starts[i]:end]
        self.ids = ids
        if len(ids) < p:
            raise DataError(f"the training split has {len(ids)} identities but train.p={p} per batch; "
                            f"set train.p <= {len(ids)}")
        self.p, self.k, self.world, self.rank, self.seed = p, k, world_size, rank, seed

    def global_batch(self, step: int) -> list[list[int]]:
        """[P] lists of K row indices, the whole world's batch for ``step``."""
        r = np.random.default_rng((self.seed, 11, step))
        chosen = r.choice(self.ids, size=self.p, replace=False)
        out = []
        for pid in chosen:
            rows = self.by_pid[int(pid)]
            pick = r.choice(rows, size=self.k, replace=len(rows) < self.k)
            out.append([int(i) for i in pick])
        return out

    def indices(self, step: int) -> list[int]:
        per = self.p // self.world
        mine = self.global_batch(step)[self.rank * per:(self.rank + 1) * per]
        return [i for group in mine for i in group]

    def flips(self, step: int) -> np.ndarray:
        """Which of this rank's images to mirror at ``step`` (augmentation, from the seed)."""
        r = np.random.default_rng((self.seed, 12, step, self.rank))
        return r.random(self.p // self.world * self.k) < 0.5


def eval_shard(n: int, world_size: int, rank: int) -> tuple[list[int], list[bool]]:
    """Rank ``rank``'s rows of an n-row split, padded so every rank has ceil(n / W) rows.

    Returns (indices, valid): padding rows repeat row 0 and are marked invalid.
    """
    per = -(-n // world_size)
    idx = list(range(rank * per, min(n, (rank + 1) * per)))
    valid = [True] * len(idx) + [False] * (per - len(idx))
    idx += [0] * (per - len(idx))
    return idx, valid


def chunks(seq: list, size: int) -> Iterator[list]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def dataset_summary(splits) -> dict:
    out = {}
    for name, ds in splits.items():
        pids = np.asarray(ds["pid"])
        cams = np.asarray(ds["camid"])
        out[name] = {"images": int(len(ds)), "identities": int(len(np.unique(pids))), "cameras": int(len(np.unique(cams)))}
    return out


def spec_meta(kind: str, spec) -> dict:
    return {"kind": kind, "spec": asdict(spec)}

"""A checkpoint step's manifest: the ``COMMITTED`` marker lists every file with its size and hash.

  {"format": "msmoe-manifest/1", "step": 20, "run_id": "...", "hash": "blake2b",
   "layout": {"ep_size": 2, "world_size": 2, "zero_stage": 0},
   "files": {"mp_rank_00_model_states.pt": {"size": 652877, "blake2b": "..."}, ...}}

``layout`` (absent in manifests written before it) is what training/checkpoint/layout_check.py checks the
files against: exactly the files of one EP size.

Older runs wrote a plain step number: such a marker still means "complete" but cannot be checked
(``Marker.legacy``). Hashing is split across ranks: file i of the sorted names belongs to rank
``i % world_size`` (:func:`share`); the caller gathers the entries or problems (training/checkpoint/store.py).
Files stream through blake2b in 4 MiB chunks, so memory stays flat whatever the checkpoint size.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from common.files import write_text_atomic

MARKER = "COMMITTED"  # inside a checkpoint step: every rank's files are written (and listed here)
FORMAT = "msmoe-manifest/1"
CHUNK = 4 << 20  # bytes read per blake2b update


@dataclass(frozen=True)
class Marker:
    """What a step's ``COMMITTED`` says. ``files`` is None for a legacy marker (a bare step number)."""
    step: int
    run_id: str | None
    files: dict[str, dict] | None
    layout: dict | None = None

    @property
    def legacy(self) -> bool:
        return self.files is None


class MarkerError(ValueError):
    """A ``COMMITTED`` that is neither a manifest nor a step number (e.g. cut short)."""


def list_files(step_dir: str) -> list[str]:
    """Every file of a step (relative paths, sorted), without the marker and temp files."""
    out = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != MARKER and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def share(names: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's part of the (sorted) names: file i goes to rank i % world_size."""
    return [n for i, n in enumerate(sorted(names)) if i % world_size == rank]


def hash_file(path: str) -> tuple[int, str]:
    """(bytes read, blake2b hex digest), streamed."""
    h, size = hashlib.blake2b(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def entries(step_dir: str, names: list[str]) -> dict[str, dict]:
    """Manifest entries of ``names`` (this rank's share at save time)."""
    out = {}
    for name in names:
        size, digest = hash_file(os.path.join(step_dir, name))
        out[name] = {"size": size, "blake2b": digest}
    return out


def write(step_dir: str, step: int, run_id: str, files: dict[str, dict], layout: dict | None = None) -> None:
    """Write the manifest atomically: the step counts as complete once this returns."""
    doc = {"format": FORMAT, "step": step, "run_id": run_id, "hash": "blake2b",
           **({"layout": dict(layout)} if layout else {}), "files": {k: files[k] for k in sorted(files)}}
    write_text_atomic(os.path.join(step_dir, MARKER), json.dumps(doc, indent=1) + "\n")


def read(step_dir: str) -> Marker:
    """Parse a step's marker; raises MarkerError (or OSError) when it cannot be read."""
    path = os.path.join(step_dir, MARKER)
    with open(path) as fh:
        text = fh.read()
    if text.strip().isdigit():
        return Marker(step=int(text.strip()), run_id=None, files=None)
    try:
        doc = json.loads(text)
        if doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
            raise ValueError(f"format {doc.get('format')!r}")
        layout = doc.get("layout") if isinstance(doc.get("layout"), dict) else None
        return Marker(step=int(doc["step"]), run_id=str(doc.get("run_id", "")), files=doc["files"], layout=layout)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise MarkerError(f"{path}: not a manifest nor a step number ({exc}; {len(text)} bytes)") from None


def check(step_dir: str, files: dict[str, dict], names: list[str]) -> list[str]:
    """Problems with ``names`` (a share of the manifest's files), one line each: 'FILE: what'."""
    problems = []
    for name in names:
        want = files[name]
        path = os.path.join(step_dir, name)
        try:
            actual = os.path.getsize(path)
            if actual != want["size"]:
                problems.append(f"{name}: size {actual} != {want['size']} in the manifest (truncated or rewritten)")
                continue
            _, digest = hash_file(path)
        except FileNotFoundError:
            problems.append(f"{name}: missing ({want['size']} bytes in the manifest)")
            continue
        except OSError as exc:
            problems.append(f"{name}: unreadable ({exc.strerror or exc})")
            continue
        if digest != want["blake2b"]:
            problems.append(f"{name}: blake2b differs: the bytes changed after the save (same size, {actual})")
    return problems

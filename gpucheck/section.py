"""What every gpu-check section shares: its command-line frame and its result file.

A section is a module ``gpucheck.sections.<name>`` run as its own process by ``gpucheck.check`` (so a
crash, a hang or a CUDA error in one loses nothing else). It writes one JSON object:

  {"section": name, "passed": bool, "summary": "one line", "figures": {...}, "rows": [...]}

``figures`` are the numbers that go into results.md; ``rows`` the per-case detail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Callable

import torch


def relative_error(mine: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """||mine - ref|| / ||ref|| in float64 on CPU (0 when both are zero). A missing gradient
    (None: the parameter took no part) counts as zeros."""
    if mine is None and ref is None:
        return 0.0
    if mine is None or ref is None:
        present = mine if mine is not None else ref
        mine, ref = (mine, torch.zeros_like(present)) if ref is None else (torch.zeros_like(present), ref)
    a, b = mine.detach().double().cpu(), ref.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    diff, scale = torch.linalg.vector_norm(a - b).item(), torch.linalg.vector_norm(b).item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="write the section's result here")
    p.add_argument("--device", default="cuda", help="cuda (the check), or cpu for a dry run")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU dry runs and tests)")
    p.add_argument("--workdir", default=None, help="scratch folder for runs and logs (default: beside --json)")
    return p


def write(path: str, section: str, passed: bool, summary: str, figures: dict, rows: list) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"section": section, "passed": bool(passed), "summary": summary, "figures": figures,
                   "rows": rows}, fh, indent=2, default=str)


def run(section: str, body: Callable[[argparse.Namespace], tuple[bool, str, dict, list]], doc: str,
        argv: list[str] | None = None, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse the frame's options, run ``body(args) -> (passed, summary, figures, rows)``, write the
    result; an exception becomes a failed result carrying its traceback (and exit code 1)."""
    p = parser(doc)
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.workdir is None:
        args.workdir = os.path.join(os.path.dirname(os.path.abspath(args.json)), section)
    os.makedirs(args.workdir, exist_ok=True)
    try:
        passed, summary, figures, rows = body(args)
    except Exception as exc:  # noqa: BLE001 - the section's failure is its result
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        write(args.json, section, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
              {}, [{"traceback": tb[-4000:]}])
        return 1
    write(args.json, section, passed, summary, figures, rows)
    print(f"{section}: {'PASS' if passed else 'FAIL'}: {summary}", flush=True)
    return 0 if passed else 1

"""Does a checkpoint step hold exactly one layout? (EP size and the expert files it needs.)

A DeepSpeed MoE step of EP size P holds one optimizer file per EP rank (``expp_rank_<r>_...``, r in
0..P-1) and one weight file per global expert (``layer_<L>_expert_<g>_...``, g in 0..E-1 for every
layer alike). A step written twice at two EP sizes into one directory (what an in-place re-save did)
lists files of both: the files all hash right, yet DeepSpeed later loads a partner's optimizer state.

The layout comes from the manifest (``layout`` since this check exists) or, for older manifests,
from the client state DeepSpeed keeps in ``mp_rank_00_model_states.pt`` (``ep_size``). No
DeepSpeed import: ``msmoe checkpoints verify`` runs it offline.
"""

from __future__ import annotations

import os

from parallel.ds_names import EXPERT_FILE_RE, OPTIM_FILE_RE
from training.checkpoint.layout import Layout

MODEL_FILE = "mp_rank_00_model_states.pt"


def saved_ep_size(step_dir: str) -> int | None:
    """``ep_size`` of the client state in the step's model file (None: absent or unreadable)."""
    path = os.path.join(step_dir, MODEL_FILE)
    if not os.path.isfile(path):
        return None
    try:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        value = state.get("ep_size") if isinstance(state, dict) else None
        return int(value) if value is not None else None
    except Exception:  # noqa: BLE001 - an unreadable file is the hash check's to report
        return None


def layout_problems(step_dir: str, names: list[str], recorded: dict | None = None) -> list[str]:
    """Problems with the step's layout, one line each (empty: one consistent layout)."""
    problems = []
    optim = sorted(int(m.group(1)) for n in names if (m := OPTIM_FILE_RE.search(os.path.basename(n))))
    ep = Layout.recorded_ep_size(recorded)
    if ep is None and optim:
        ep = saved_ep_size(step_dir)
    if optim and ep is not None and optim != list(range(int(ep))):
        problems.append(f"layout: optimizer files of EP ranks {optim} but the step was saved at EP size {ep} "
                        f"(expected ranks {list(range(int(ep)))}): files of two saves are mixed in one directory")
    elif optim and optim != list(range(len(optim))):
        problems.append(f"layout: optimizer files of EP ranks {optim}: not 0..{len(optim) - 1}")
    experts: dict[int, list[int]] = {}
    for n in names:
        if m := EXPERT_FILE_RE.fullmatch(os.path.basename(n)):
            experts.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    counts = {layer: len(ids) for layer, ids in experts.items()}
    for layer, ids in sorted(experts.items()):
        if sorted(ids) != list(range(len(ids))):
            problems.append(f"layout: layer {layer} has expert files {sorted(ids)}: not 0..{len(ids) - 1}")
    if len(set(counts.values())) > 1:
        problems.append(f"layout: expert files per layer differ ({counts})")
    if ep and experts and any(c % int(ep) for c in counts.values()):
        problems.append(f"layout: {counts} experts per layer do not divide over EP size {ep}")
    return problems

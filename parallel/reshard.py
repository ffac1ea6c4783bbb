"""Move a DeepSpeed MoE checkpoint to another expert-parallel size, optimizer state included.

A DeepSpeed checkpoint of an EP model (ZeRO stage 0) holds, per tag:
  mp_rank_00_model_states.pt                  dense weights (identical on every rank)
  layer_<L>_expert_<g>_mp_rank_00_model_states.pt   expert g's weights, keyed by *global* id
  expp_rank_<r>_mp_rank_00_optim_states.pt    the optimizer of EP rank r: dense states (identical
                                              on every rank) and the states of r's local experts,
                                              stacked [E_local, ...] exactly like the parameters
Weights are already stored per global expert, so they load at any EP size. The optimizer files
are not: DeepSpeed refuses them at another EP size (its group sizes no longer match). Here the
expert states of all source ranks are concatenated along the expert axis (rank r holds experts
r*El .. (r+1)*El-1) and cut again for the new ranks, so every expert's Adam moments land on the
rank that now owns it; dense states are copied.

A ZeRO stage 1/2 checkpoint partitions that state over the ranks instead (``zero_pp_rank_<r>``
files): its per-EP-rank states are first rebuilt as ZeRO 0 would have saved them
(parallel/zero_state.py), so the result is a ZeRO 0 checkpoint at the new EP size, which a ZeRO 0
run loads as it is and a ZeRO 1/2 run at any world size loads through parallel/zero_load.py.
"""

from __future__ import annotations

import copy
import glob
import os
import re
import shutil

import torch

from common.errors import UserError
from common.files import staged_dir
from parallel.ds_names import EXPERT_FILE, EXPERT_FILE_RE, LAYER_KEY, OPTIM_FILE, PER_EXPERT_KEY, PER_EXPERT_KEY_RE
from parallel.groups import group_name
from parallel.zero_state import ZeroStateError, plain_states, zero_files, zero_stage_of



class ReshardError(UserError, ValueError):
    pass


MODEL = "mp_rank_00_model_states.pt"


def _load(path: str):
    return torch.load(path, map_location="cpu", weights_only=False)


def source_ep_size(tag_dir: str) -> int:
    files = glob.glob(os.path.join(tag_dir, "expp_rank_*_mp_rank_00_optim_states.pt"))
    if not files:
        raise ReshardError(f"{tag_dir} holds no expp_rank_*_optim_states.pt files: not a DeepSpeed MoE checkpoint")
    ranks = sorted(int(re.search(r"expp_rank_(\d+)_", f).group(1)) for f in files)
    if ranks != list(range(len(ranks))):
        raise ReshardError(f"{tag_dir}: optimizer files for EP ranks {ranks} are not 0..{len(ranks) - 1}")
    return len(ranks)


def optimizer_of(obj: dict, path: str) -> dict:
    opt = obj.get("optimizer")
    if not isinstance(opt, dict) or "state" not in opt or "param_groups" not in opt:
        raise ReshardError(
            f"{path}: not a plain optimizer state (a bf16/fp16 run's DeepSpeed optimizer): resume it at the EP size "
            "it was saved at, or start a new run from its weights with --init-from (the optimizer state restarts)"
        )
    return opt


def reshard_optimizer(sources: list[dict], new_ep_size: int) -> list[dict]:
    """Optimizer state dicts of the P source EP ranks -> those of ``new_ep_size`` ranks."""
    base = sources[0]
    shapes = [[len(g["params"]) for g in s["param_groups"]] for s in sources]
    if any(sh != shapes[0] for sh in shapes):
        raise ReshardError(f"source optimizer files disagree on their parameter groups: {shapes}")
    out = []
    for r in range(new_ep_size):
        groups = copy.deepcopy(base["param_groups"])
        state: dict = {}
        for g in groups:
            moe = bool(g.get("moe", False))
            if moe:
                g["name"] = group_name(new_ep_size)
            for idx in g["params"]:
                if idx not in base["state"]:
                    continue
                if not moe:
                    state[idx] = copy.deepcopy(base["state"][idx])
                    continue
                entry = {}
                for key, value in base["state"][idx].items():
                    if torch.is_tensor(value) and value.dim() >= 1:
                        full = torch.cat([s["state"][idx][key] for s in sources], dim=0)  # [E, ...]
                        if full.shape[0] % new_ep_size:
                            raise ReshardError(f"optimizer state {key} of parameter {idx} covers {full.shape[0]} "
                                               f"experts, not divisible by ep_size={new_ep_size}")
                        per = full.shape[0] // new_ep_size
                        entry[key] = full[r * per:(r + 1) * per].clone()
                    else:
                        entry[key] = copy.deepcopy(value)  # Adam's step count: the same everywhere
                state[idx] = entry
        out.append({"state": state, "param_groups": groups})
    return out


def reshard_checkpoint(src_dir: str, tag: str, dst_dir: str, new_ep_size: int) -> dict:
    """Write ``dst_dir/<tag>`` for ``new_ep_size`` EP ranks (complete or not at all). Returns a summary.

    The caller commits it (``latest`` and the completion marker: ``training.checkpoint.store.mark_complete``)."""
    src = os.path.join(src_dir, tag)
    if not os.path.isdir(src):
        raise ReshardError(f"no checkpoint tag {tag!r} in {src_dir}")
    model = _load(os.path.join(src, MODEL))
    zero = zero_stage_of(model)
    for e in model.get("num_experts") or []:
        if e % new_ep_size:
            raise ReshardError(f"a MoE layer has num_experts={e}, not divisible by the new ep_size={new_ep_size}")
    if zero == 0:
        p_src = source_ep_size(src)
        sources_raw = [_load(os.path.join(src, OPTIM_FILE.format(r))) for r in range(p_src)]
        sources = [optimizer_of(o, os.path.join(src, OPTIM_FILE.format(r))) for r, o in enumerate(sources_raw)]
        extra = {k: v for k, v in sources_raw[0].items() if k != "optimizer"}
    else:
        try:
            sources = plain_states(src, model)
        except ZeroStateError as exc:
            raise ReshardError(str(exc)) from None
        p_src, extra = len(sources), {}
    new = reshard_optimizer(sources, new_ep_size)

    dst = os.path.join(dst_dir, tag)
    skip = {OPTIM_FILE.format(r) for r in range(p_src)} | set(zero_files(src).values())
    skip.add("COMMITTED")  # the source's manifest lists the source's files: the caller commits the copy
    with staged_dir(dst) as tmp:
        for f in os.listdir(src):
            if f not in skip and not (zero and f == MODEL):
                shutil.copy2(os.path.join(src, f), os.path.join(tmp, f))
        if zero:  # now a ZeRO 0 checkpoint of the new EP size (training/checkpoint/elastic.py reads its layout from here)
            model["ds_config"] = {**model["ds_config"], "zero_optimization": {
                **model["ds_config"]["zero_optimization"], "stage": 0}}
            model.update(param_shapes=None, optimizer=None, ep_size=new_ep_size)
            torch.save(model, os.path.join(tmp, MODEL))
        for r, opt in enumerate(new):
            torch.save({**extra, "optimizer": opt}, os.path.join(tmp, OPTIM_FILE.format(r)))
    return {"tag": tag, "from_ep_size": p_src, "to_ep_size": new_ep_size, "from_zero_stage": zero, "out": dst}


def resize_experts_checkpoint(src_dir: str, tag: str, dst_dir: str, transform, layer_prefix: str = "blocks.") -> dict:
    """Change the expert count of the MoE layers under ``layer_prefix`` in a DeepSpeed checkpoint
    (weights only).

    ``transform(layer_state, num_experts, module_prefix) -> new layer_state`` works on one layer's
    state in the layer's own naming ("router....", or "coarse....", "fine.<g>...." for a
    HierarchicalMoE, and "experts.<name>" stacked [E, ...]; see moe/resize.py); ``module_prefix``
    is the layer's module path ("blocks.1.ffn."). Its new expert count is read from the stacked
    experts it returns. MoE layers elsewhere (e.g. a head's, "fusion....") keep their expert files
    byte for byte and their keys and expert count as they were; ``num_experts`` is written per layer.
    The optimizer state cannot follow a change of shape, so none is written: load the result
    with ``load_module_only`` (``msmoe train --init-from``). Like :func:`reshard_checkpoint`,
    ``dst_dir/<tag>`` appears complete or not at all, and the caller commits it.
    """
    src = os.path.join(src_dir, tag)
    model = _load(os.path.join(src, "mp_rank_00_model_states.pt"))
    files = _expert_files(src)
    counts = list(model.get("num_experts") or [])
    if len(counts) != len(files):
        raise ReshardError(f"{src}: the model file lists num_experts={counts} for {len(files)} MoE layers' expert files")
    module = dict(model["module"])
    new_files: dict[str, dict] = {}
    copied: list[str] = []
    resized: dict[str, tuple[int, int]] = {}  # module prefix -> (old, new) experts
    for layer in sorted(files):
        e = len(files[layer])
        if sorted(files[layer]) != list(range(e)):
            raise ReshardError(f"layer {layer}: expert files {sorted(files[layer])} are not 0..{e - 1}")
        first = _load(os.path.join(src, files[layer][0]))
        module_prefix, names = _expert_keys(first)
        if not module_prefix.startswith(layer_prefix):
            copied += list(files[layer].values())  # not ours to resize: byte for byte
            continue
        experts = {0: first, **{g: _load(os.path.join(src, files[layer][g])) for g in range(1, e)}}
        new_e = _resize_layer(experts, layer, module_prefix, names, module, transform, new_files)
        counts[layer] = new_e
        resized[module_prefix] = (e, new_e)
    if not resized:
        raise ReshardError(f"{src} holds no MoE layer under {layer_prefix!r}: nothing to resize")
    model["module"] = module
    model["num_experts"] = counts
    dst = os.path.join(dst_dir, tag)
    _write_resized(src, dst, model, copied, new_files)
    return {"tag": tag, "layers": len(resized), "from_experts": [a for a, _ in resized.values()],
            "to_experts": [b for _, b in resized.values()], "resized": resized, "num_experts": counts, "out": dst}


def _expert_files(src: str) -> dict[int, dict[int, str]]:
    """The expert files of checkpoint tag ``src``: layer -> expert id -> file name."""
    files: dict[int, dict[int, str]] = {}
    for f in os.listdir(src):
        m = EXPERT_FILE_RE.fullmatch(f)
        if m:
            files.setdefault(int(m.group(1)), {})[int(m.group(2))] = f
    if not files:
        raise ReshardError(f"{src} holds no expert files: not a DeepSpeed MoE checkpoint")
    return files


def _expert_keys(expert_sd: dict) -> tuple[str, list[str]]:
    """One expert file's state dict -> (the layer's module prefix, its experts' parameter names)."""
    module_prefix, names = None, []
    for k in expert_sd:
        m = PER_EXPERT_KEY_RE.fullmatch(k)
        module_prefix, names = m.group(1), names + [m.group(3)]
    return module_prefix, names


def _resize_layer(experts: dict, layer: int, module_prefix: str, names: list[str], module: dict, transform,
                  new_files: dict) -> int:
    """Run ``transform`` on one MoE layer (``experts``: expert id -> its file's state dict): its new
    non-expert keys go into ``module``, its new expert files into ``new_files``. -> the new expert count."""
    e = len(experts)
    prefix = module_prefix + LAYER_KEY  # the layer's own keys: "router....", "fine.<g>....", ...
    expert_key = module_prefix + PER_EXPERT_KEY + "{}.{}"  # expert id, parameter name
    state = {f"experts.{n}": torch.stack([experts[g][expert_key.format(g, n)] for g in range(e)])
             for n in names}
    state.update({k[len(prefix):]: v for k, v in module.items() if k.startswith(prefix)})
    new_state = transform(state, e, module_prefix)
    new_e = new_state[f"experts.{names[0]}"].shape[0]
    for k, v in new_state.items():
        if not k.startswith("experts."):
            module[prefix + k] = v
    for g in range(new_e):
        new_files[EXPERT_FILE.format(layer=layer, expert=g)] = {
            expert_key.format(g, n): new_state[f"experts.{n}"][g].clone() for n in names}
    return new_e


def _write_resized(src: str, dst: str, model: dict, copied: list[str], new_files: dict[str, dict]) -> None:
    """Write the resized checkpoint tag ``dst`` (complete or not at all): the model file, the expert
    files copied from ``src`` as they are, and the new ones."""
    with staged_dir(dst) as tmp:
        torch.save(model, os.path.join(tmp, "mp_rank_00_model_states.pt"))
        for name in copied:
            shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        for name, sd in new_files.items():
            torch.save(sd, os.path.join(tmp, name))

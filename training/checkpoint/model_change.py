"""A ``--resume`` whose config builds another model than the run was trained with: refused up front.

The run's own ``config.yaml`` (written by every start and resume, see training/job.py) holds the
model it was trained with. Before anything loads (and before ``config.yaml`` is written again),
the model section of the new config is compared with it, field by field, in effect (defaults filled
in, the sub-configs the model does not use left out). Any difference is refused, each field named
old -> new, with the command that does what was meant:

  same parameter shapes (top_k, temperature, ...)  the checkpoint loads: ``--accept-model-change``
                                                    resumes with the new values
  another expert count                             ``msmoe convert --num-experts`` (weights only),
                                                    then a new run ``--init-from`` the result
  any other shape (dim, depth, ...)                no checkpoint of the run loads: resume with the
                                                    saved values, or start a new run

Whether the shapes change is decided by building both models on the meta device (no memory, no
weights) and comparing every parameter's name and shape.
"""

from __future__ import annotations

import dataclasses
import os
import shlex

import yaml

from common.config import ConfigError

FLAG = "--accept-model-change"
EXPERT_COUNT = "model.patch_moe.router.num_experts"


class ModelChangeError(ConfigError):
    """The resumed run's config changes its model (exit 2, said once: every rank finds it alike)."""


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def effective(model) -> dict:
    """The model config as the model is built from it: sub-configs with their defaults, unused ones left out."""
    out = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    out["patch_moe"] = dataclasses.asdict(model.patch_moe_config())
    out["multiscale"] = dataclasses.asdict(model.multiscale_config())
    out["hierarchical"] = dataclasses.asdict(model.hierarchical_config()) if model.moe_kind == "hierarchical" else None
    out["hierarchical_fusion"] = (dataclasses.asdict(model.hierarchical_fusion_config())
                                  if model.fusion == "hierarchical" else None)
    return _plain(out)


def _flat(d, prefix: str) -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}"))
    return out


def _diff(a: dict, b: dict, missing: str) -> dict[str, tuple]:
    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def changes(old, new) -> dict[str, tuple]:
    """dotted field -> (old, new) for every model field whose effective value differs; named as the configs
    set them (``model.dim``, not the sub-configs' ``dim`` that follow it) where they do."""
    in_effect = _diff(_flat(effective(old), "model"), _flat(effective(new), "model"), "(not used)")
    as_set = _diff(_flat(_plain(dataclasses.asdict(old)), "model"), _flat(_plain(dataclasses.asdict(new)), "model"),
                   "(not set)")
    named = {k: v for k, v in as_set.items() if k in in_effect}
    return named or in_effect


def parameter_shapes(model_cfg) -> dict[str, tuple]:
    """Every parameter's and buffer's shape of the model ``model_cfg`` builds (meta device: nothing allocated)."""
    import torch

    from reid.model import ReIDModel

    try:
        with torch.device("meta"):
            model = ReIDModel(model_cfg, num_classes=2)
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel: build it for real
        model = ReIDModel(model_cfg, num_classes=2)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_resume(cfg, resume: bool, accept: bool, config: str, overrides: tuple[str, ...]) -> None:
    """Refuse a resume whose config changes the model of the run in ``cfg.run_dir`` (see the module docstring)."""
    from training.config import load_config

    saved_path = os.path.join(cfg.run_dir, "config.yaml")
    if not resume or not os.path.isfile(saved_path):
        return
    try:
        saved = load_config(saved_path).model
    except (ConfigError, OSError, yaml.YAMLError):
        return  # not readable as a config (an older msmoe): the load itself names a shape mismatch
    diff = changes(saved, cfg.model)
    if not diff:
        return
    listed = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in diff.items())
    head = f"--resume: this config changes the model of run {cfg.name!r} (as trained: {saved_path}): {listed}. "
    same_shapes = parameter_shapes(saved) == parameter_shapes(cfg.model)
    if same_shapes and accept:
        return
    back = " ".join(f"{k}={_arg(a)}" for k, (a, _) in diff.items() if a not in ("(not used)", "(not set)"))
    if same_shapes:
        raise ModelChangeError(
            head + f"The parameter shapes stay the same, so the checkpoint loads: add {FLAG} to resume with the new "
            f"values; or resume with the saved ones ({back}); or start a new run from its weights (the optimizer "
            f"state restarts): {_init_command(cfg, config, overrides, os.path.join(cfg.run_dir, 'checkpoints'))}")
    raise ModelChangeError(head + "The parameter shapes change, so no checkpoint of this run loads into the new "
                           f"model ({FLAG} does not help). " + _shape_fix(cfg, saved, diff, config, overrides, back))


def _shape_fix(cfg, saved, diff: dict, config: str, overrides: tuple[str, ...], back: str) -> str:
    ckpt = os.path.join(cfg.run_dir, "checkpoints")
    keep = f"Resume with the saved values ({back}), or start a new run (another name=, or --overwrite)"
    experts = diff.get(EXPERT_COUNT)
    if experts is None or cfg.model.moe_kind != "patch" or saved.moe_kind != "patch":
        counts = [k for k in diff if "num_experts" in k or "experts_per_group" in k or "num_groups" in k]
        hint = (f"; expert counts change with `msmoe convert --num-experts` (see `msmoe convert --help`), then "
                f"--init-from its output" if counts else "")
        return keep + hint + "."
    old, new = experts
    out = f"{os.path.dirname(cfg.run_dir.rstrip(os.sep))}{os.sep}{cfg.name}-experts{new}"
    if new > old and new % old == 0:
        mode = "--mode upcycle --noise 0.01"
    elif new < old:
        mode = f"--mode prune --usage {os.path.join(cfg.run_dir, 'summary.json')}"  # the usage of a finished run
    else:
        return keep + f"; `msmoe convert` upcycles {old} experts to a multiple of {old}, or prunes/merges to fewer."
    return (keep + f". To keep the trained weights with {new} experts (weights only, the optimizer state restarts): "
            f"msmoe convert --src {ckpt} --out {out} --num-experts {new} {mode}, then "
            f"{_init_command(cfg, config, overrides, out, suffix=f'-e{new}')}")


def _init_command(cfg, config: str, overrides: tuple[str, ...], init_from: str, suffix: str = "-new") -> str:
    """This command as a new run (name + suffix) that starts from the weights in ``init_from``."""
    kept = [o for o in overrides if not o.startswith("name=")]
    words = ["msmoe", "train", "--config", config, *kept, f"name={cfg.name}{suffix}", "--init-from", init_from]
    return " ".join(shlex.quote(w) for w in words)


def _show(value) -> str:
    return "null" if value is None else str(value)


def _arg(value) -> str:
    return shlex.quote(yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip())

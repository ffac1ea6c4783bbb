"""Run configuration: typed, validated up front, loaded from YAML with ``key=value`` overrides.

A YAML file may start with ``base: other.yaml`` (relative to itself): the base is loaded first
and this file's keys override it, recursively. Overrides on the command line use dotted keys
(``train.steps=50 model.patch_moe.router.num_experts=8``); values are parsed as YAML.
Unknown keys and bad values fail before anything starts, naming the key, the value and the fix.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal, Mapping, get_type_hints

import yaml

from moe.config import (
    ConfigError,
    HierarchicalMoEConfig,
    MultiScaleMoEConfig,
    PatchMoEConfig,
    expert_sharding_error,
    from_dict,
)
from reid.synth import SynthSpec


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class DataConfig:
    """path: a dataset made by ``msmoe data`` (Arrow). source "synth" generates it there when
    missing (from ``synth``); "disk" requires it to exist (e.g. an imported RGBNT201)."""

    path: str = "data_cache/synth"
    source: Literal["synth", "disk"] = "synth"
    synth: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.source in ("synth", "disk"), f"data.source={self.source!r} must be 'synth' or 'disk'")
        self.synth_spec()  # validates

    def synth_spec(self) -> SynthSpec:
        try:
            return from_dict(SynthSpec, self.synth, "data.synth")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64
    stem_stride: int = 4
    depth: int = 4
    moe_blocks: tuple[int, ...] = (1, 3)
    mlp_ratio: float = 2.0
    kernel: int = 7
    dropout: float = 0.0
    patch_moe: dict = field(default_factory=lambda: {"patch_size": 8, "router": {"num_experts": 4, "top_k": 2}})
    multiscale: dict = field(default_factory=dict)
    moe_kind: Literal["patch", "hierarchical"] = "patch"
    hierarchical: dict = field(default_factory=lambda: {
        "num_groups": 3, "experts_per_group": 3, "coarse": {"num_experts": 3, "top_k": 1},
        "fine": {"num_experts": 3, "top_k": 2}})

    def __post_init__(self) -> None:
        _require(self.moe_kind in ("patch", "hierarchical"),
                 f"model.moe_kind={self.moe_kind!r} must be 'patch' or 'hierarchical'")
        _require(self.dim >= 8 and self.dim % 2 == 0, f"model.dim={self.dim} must be an even number >= 8")
        _require(self.stem_stride in (1, 2, 4, 8, 16), f"model.stem_stride={self.stem_stride} must be 1, 2, 4, 8 or 16")
        _require(self.depth >= 1, f"model.depth={self.depth} must be >= 1")
        bad = [b for b in self.moe_blocks if not 0 <= b < self.depth]
        _require(not bad, f"model.moe_blocks={list(self.moe_blocks)}: block(s) {bad} outside 0..{self.depth - 1}")
        _require(self.kernel % 2 == 1, f"model.kernel={self.kernel} must be odd")
        _require(self.mlp_ratio > 0, f"model.mlp_ratio={self.mlp_ratio} must be > 0")
        _require(0 <= self.dropout < 1, f"model.dropout={self.dropout} must be in [0, 1)")
        self.patch_moe_config()
        self.multiscale_config()
        if self.moe_kind == "hierarchical":
            self.hierarchical_config()

    def patch_moe_config(self) -> PatchMoEConfig:
        data = dict(self.patch_moe)
        data.setdefault("dim", self.dim)
        _require(data["dim"] == self.dim, f"model.patch_moe.dim={data['dim']} must equal model.dim={self.dim} (or be left out)")
        data.setdefault("expert", {"kind": "ffn", "hidden_dim": int(self.dim * self.mlp_ratio), "dropout": self.dropout})
        data.setdefault("pruned_output", "zero")  # the MoE sits in a residual branch: x + 0 leaves a pruned patch as it was
        return from_dict(PatchMoEConfig, data, "model.patch_moe")

    def multiscale_config(self) -> MultiScaleMoEConfig:
        data = dict(self.multiscale)
        data.setdefault("dim", self.dim)
        return from_dict(MultiScaleMoEConfig, data, "model.multiscale")

    def hierarchical_config(self) -> HierarchicalMoEConfig:
        """Coarse groups x fine experts; patch size and experts as in ``patch_moe`` unless given."""
        pm = self.patch_moe_config()
        data = dict(self.hierarchical)
        data.setdefault("dim", self.dim)
        data.setdefault("patch_size", pm.patch_size)
        data.setdefault("expert", {"kind": pm.expert.kind, "hidden_dim": pm.expert.hidden_dim,
                                   "dropout": pm.expert.dropout})
        data.setdefault("balance", {"load_balance_coef": pm.balance.load_balance_coef,
                                    "z_loss_coef": pm.balance.z_loss_coef})
        return from_dict(HierarchicalMoEConfig, data, "model.hierarchical")

    @property
    def num_experts(self) -> int:
        if self.moe_kind == "hierarchical":
            return self.hierarchical_config().num_experts
        return self.patch_moe_config().router.num_experts


@dataclass(frozen=True)
class TrainConfig:
    """p identities x k images per *global* batch; lr warms up linearly then follows a cosine to
    lr * min_lr_ratio at ``steps`` (a function of the step only, so resuming is exact)."""

    steps: int = 600
    p: int = 16
    k: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    min_lr_ratio: float = 0.05
    label_smoothing: float = 0.1
    triplet_margin: float = 0.3
    triplet_weight: float = 1.0
    ep_size: int = 1
    zero_stage: int = 0
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    log_every: int = 10
    stage_timing: Literal["sampled", "off"] = "sampled"  # stage breakdown measured on one step per log_every
    ckpt_every: int = 200
    threads: int = 0  # torch threads per rank; 0 = cores / local ranks
    prefetch: int = 2  # batches prepared ahead of the step by a background thread; 0 = in the step itself
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted after each commit)
    collective_timeout_s: float = 300.0  # a rank silent this long makes the others fail, naming the collective
    max_bad_steps: int = 5  # non-finite loss/gradients this many steps in a row: checkpoint and stop
    collapse_share: float = 0.9  # one expert taking more than this share of a layer's patches ...
    collapse_intervals: int = 3  # ... for this many logging intervals in a row is reported as a collapse

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"train.steps={self.steps} must be >= 1")
        _require(self.p >= 2, f"train.p={self.p} must be >= 2 (the triplet loss needs negatives)")
        _require(self.k >= 2, f"train.k={self.k} must be >= 2 (the triplet loss needs positives)")
        _require(self.lr > 0, f"train.lr={self.lr} must be > 0")
        _require(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay} must be >= 0")
        _require(0 <= self.warmup_steps, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _require(0 <= self.label_smoothing < 1, f"train.label_smoothing={self.label_smoothing} must be in [0, 1)")
        _require(self.triplet_margin >= 0, f"train.triplet_margin={self.triplet_margin} must be >= 0")
        _require(self.ep_size >= 1, f"train.ep_size={self.ep_size} must be >= 1")
        _require(self.zero_stage in (0, 1, 2), f"train.zero_stage={self.zero_stage} must be 0, 1 or 2")
        _require(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0 (0 = off)")
        _require(self.precision in ("fp32", "bf16"), f"train.precision={self.precision!r} must be 'fp32' or 'bf16'")
        _require(self.log_every >= 1, f"train.log_every={self.log_every} must be >= 1")
        _require(self.stage_timing in ("sampled", "off"),
                 f"train.stage_timing={self.stage_timing!r} must be 'sampled' (one step per log_every, "
                 "synchronised on GPUs) or 'off'")
        _require(self.ckpt_every >= 1, f"train.ckpt_every={self.ckpt_every} must be >= 1")
        _require(self.threads >= 0, f"train.threads={self.threads} must be >= 0")
        _require(isinstance(self.prefetch, int) and not isinstance(self.prefetch, bool) and 0 <= self.prefetch <= 64,
                 f"train.prefetch={self.prefetch!r} must be a whole number of batches in 0..64 "
                 "(2 is plenty: it only has to stay ahead of one step; 0 turns prefetching off)")
        _require(self.keep_last >= 1, f"train.keep_last={self.keep_last} must be >= 1")
        _require(self.collective_timeout_s > 0,
                 f"train.collective_timeout_s={self.collective_timeout_s} must be > 0 (seconds)")
        _require(self.max_bad_steps >= 1, f"train.max_bad_steps={self.max_bad_steps} must be >= 1")
        _require(0 < self.collapse_share <= 1, f"train.collapse_share={self.collapse_share} must be in (0, 1]")
        _require(self.collapse_intervals >= 1, f"train.collapse_intervals={self.collapse_intervals} must be >= 1")

    def lr_at(self, step: int) -> float:
        import math

        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        lo = self.lr * self.min_lr_ratio
        return lo + (self.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 64
    untrained: bool = True  # also evaluate the model before training (the baseline in reports)
    max_rank: int = 20  # CMC curve length

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"eval.batch_size={self.batch_size} must be >= 1")
        _require(self.max_rank >= 10, f"eval.max_rank={self.max_rank} must be >= 10 (Rank-10 is reported)")


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    seed: int = 0
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, f"name={self.name!r} must be a non-empty name without '/'")
        problem = expert_sharding_error(self.model.num_experts, self.train.ep_size,
                                        experts_field="model.patch_moe.router.num_experts", ep_field="train.ep_size")
        _require(problem is None, str(problem))

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out_dir, self.name)

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls: type, data: Mapping[str, Any], path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {path or 'the config'}; known keys: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        where = f"{path}.{name}" if path else name
        if is_dataclass(hint):
            value = _build(hint, value or {}, where)
        elif getattr(hint, "__origin__", None) is tuple and isinstance(value, list):
            value = tuple(value)
        elif hint in (int, float) and not isinstance(value, (int, float)) or isinstance(value, bool) and hint in (int, float):
            raise ConfigError(f"{where}={value!r} must be a number")
        elif hint is float and isinstance(value, int):
            value = float(value)
        kwargs[name] = value
    return cls(**kwargs)


def _merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml(path: str, _seen: tuple = ()) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    real = os.path.realpath(path)
    if real in _seen:
        raise ConfigError(f"config {path!r} includes itself through 'base'")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path!r} must be a YAML mapping")
    base = data.pop("base", None)
    if base:
        data = _merge(load_yaml(os.path.join(os.path.dirname(path), base), _seen + (real,)), data)
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    data = load_yaml(path) if path else {}
    return config_from_dict(apply_overrides(data, list(overrides)))


def config_from_dict(data: Mapping) -> RunConfig:
    """Defaults, overridden key by key (nested dicts merge) by ``data``."""
    try:
        return _build(RunConfig, _merge(asdict(RunConfig()), data), "")
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc

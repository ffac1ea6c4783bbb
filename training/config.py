"""Run configuration: typed, validated up front, loaded from YAML with ``key=value`` overrides.

A YAML file may start with ``base: other.yaml`` (relative to itself): the base is loaded first
and this file's keys override it, recursively. Overrides on the command line use dotted keys
(``train.steps=50 model.patch_moe.router.num_experts=8``); values are parsed as YAML.
Unknown keys and bad values fail before anything starts, naming the key, the value and the fix.
The sections ``data`` and ``model`` are reid's (reid/config.py); ``train`` and ``eval`` are here.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Literal, Mapping

import yaml

from common.config import ConfigError, check_literals, from_dict, require
from moe.config import expert_sharding_error
from reid.config import DataConfig, ModelConfig


@dataclass(frozen=True)
class TrainConfig:
    """p identities x k images per *global* batch; lr warms up linearly then follows a cosine to
    lr * min_lr_ratio at ``steps`` (a function of the step only, so resuming is exact).

    Expert parallelism: ``ep_size`` P ranks share the experts (the world size must be a multiple of
    P). ``elastic_ep: true`` is for jobs whose world size changes between restarts (torchrun
    ``--nnodes 1:2``, a requeue on fewer GPUs): ``ep_size`` is then the largest EP size, and a run of
    W ranks uses the largest P <= ep_size that divides both W and the expert count (ep_size=4, 4
    experts: EP=4 on 4 or 8 ranks, EP=2 on 2 or 6, EP=1 on 1 or 3). ``--resume`` at another EP size
    reshards the checkpoint on load, at every ZeRO stage (training/checkpoint/elastic.py).

    ``transport`` (parallel/transport.py): how HierarchicalMoE blocks move patches between ranks.
    "flat" sends every (group, fine expert) slot straight to its expert's rank; "node_local" (with
    ``model.hierarchical.placement: grouped``) sends a patch once per coarse slot to the node holding
    its group and does the fine-level exchange inside that node. Nodes: the launcher's
    LOCAL_WORLD_SIZE ranks each; ``train.ep_size`` must be whole nodes and every group must sit on
    one node (checked at start-up); with ``elastic_ep`` the EP size is one that fits so where there
    is one (RunConfig.ep_size_at).
    """

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
    elastic_ep: bool = False  # ep_size is the largest EP size; the run's follows its world size (ep_size_for)
    transport: Literal["flat", "node_local"] = "flat"  # hierarchical blocks' exchange (parallel/transport.py)
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
    profile_steps: tuple[int, ...] | None = None  # [a, b]: torch.profiler records steps a..b (training/profiling.py)
    wandb_project: str = ""  # also log the metrics to this Weights & Biases project (needs the wandb package)

    def __post_init__(self) -> None:
        check_literals(self, "train.")
        require(self.steps >= 1, f"train.steps={self.steps} must be >= 1")
        require(self.p >= 2, f"train.p={self.p} must be >= 2 (the triplet loss needs negatives)")
        require(self.k >= 2, f"train.k={self.k} must be >= 2 (the triplet loss needs positives)")
        require(self.lr > 0, f"train.lr={self.lr} must be > 0")
        require(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay} must be >= 0")
        require(0 <= self.warmup_steps, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        require(0 <= self.label_smoothing < 1, f"train.label_smoothing={self.label_smoothing} must be in [0, 1)")
        require(self.triplet_margin >= 0, f"train.triplet_margin={self.triplet_margin} must be >= 0")
        require(self.ep_size >= 1, f"train.ep_size={self.ep_size} must be >= 1")
        require(self.zero_stage in (0, 1, 2), f"train.zero_stage={self.zero_stage} must be 0, 1 or 2")
        require(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0 (0 = off)")
        require(self.log_every >= 1, f"train.log_every={self.log_every} must be >= 1")
        require(self.ckpt_every >= 1, f"train.ckpt_every={self.ckpt_every} must be >= 1")
        require(self.threads >= 0, f"train.threads={self.threads} must be >= 0")
        require(isinstance(self.prefetch, int) and not isinstance(self.prefetch, bool) and 0 <= self.prefetch <= 64,
                f"train.prefetch={self.prefetch!r} must be a whole number of batches in 0..64 "
                "(2 is plenty: it only has to stay ahead of one step; 0 turns prefetching off)")
        require(self.keep_last >= 1, f"train.keep_last={self.keep_last} must be >= 1")
        require(self.collective_timeout_s > 0,
                f"train.collective_timeout_s={self.collective_timeout_s} must be > 0 (seconds)")
        require(self.max_bad_steps >= 1, f"train.max_bad_steps={self.max_bad_steps} must be >= 1")
        require(0 < self.collapse_share <= 1, f"train.collapse_share={self.collapse_share} must be in (0, 1]")
        require(self.collapse_intervals >= 1, f"train.collapse_intervals={self.collapse_intervals} must be >= 1")
        if self.profile_steps is not None:
            ps = self.profile_steps
            require(isinstance(ps, tuple) and len(ps) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in ps)
                    and 1 <= ps[0] <= ps[1] <= self.steps,
                    f"train.profile_steps={list(ps) if isinstance(ps, tuple) else ps!r} must be [a, b] with "
                    f"1 <= a <= b <= train.steps={self.steps} (the steps to record, as logged: e.g. [5, 7]); "
                    "leave it unset (null) to profile nothing")
        require(isinstance(self.wandb_project, str),
                f"train.wandb_project={self.wandb_project!r} must be a project name (text), or empty for no W&B")

    def ep_size_for(self, world_size: int, num_experts: int, fits=None) -> int:
        """The EP size of a run of ``world_size`` ranks (see the class docstring); ``num_experts``: a
        count every expert-parallel layer's expert count is a multiple of (their gcd). ``fits(p)``:
        with elastic_ep, prefer the EP sizes it accepts (RunConfig.ep_size_at: node_local's)."""
        if self.elastic_ep:
            sizes = [p for p in range(1, self.ep_size + 1) if world_size % p == 0 and num_experts % p == 0]
            return max([p for p in sizes if fits(p)] if fits and any(fits(p) for p in sizes) else sizes)
        require(world_size % self.ep_size == 0,
                f"world size {world_size} is not divisible by train.ep_size={self.ep_size}: choose train.ep_size in "
                f"{[p for p in range(1, world_size + 1) if world_size % p == 0 and num_experts % p == 0]}, or set "
                f"train.elastic_ep=true to take the largest EP size up to {self.ep_size} that fits the world size "
                f"(e.g. an elastic restart on fewer ranks)")
        return self.ep_size

    def deepspeed_config(self, world_size: int) -> dict:
        """DeepSpeed's config for this run (batch, ZeRO stage, clipping, bf16 with fp32 reductions)."""
        out = {
            "train_micro_batch_size_per_gpu": self.p * self.k // world_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": self.grad_clip,
            "bf16": {"enabled": self.precision == "bf16"},
            "steps_per_print": 10**9,
        }
        if self.precision == "bf16":
            from parallel.engine import bf16_reduction

            out.update(bf16_reduction(self.zero_stage))
        return out

    def lr_at(self, step: int) -> float:
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
    modalities: tuple[str, ...] = ("rgb", "nir", "tir")  # those the evaluation sees (others absent)
    missing_modalities: bool = True  # the final report also evaluates with each modality absent

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, f"eval.batch_size={self.batch_size} must be >= 1")
        require(self.max_rank >= 10, f"eval.max_rank={self.max_rank} must be >= 10 (Rank-10 is reported)")
        known = ("rgb", "nir", "tir")
        require(len(self.modalities) >= 1 and set(self.modalities) <= set(known)
                and len(set(self.modalities)) == len(self.modalities),
                f"eval.modalities={list(self.modalities)} must name one or more of {list(known)}, each once")


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
        require(bool(self.name) and "/" not in self.name, f"name={self.name!r} must be a non-empty name without '/'")
        for experts_field, num_experts in self.model.expert_layers.items():
            problem = expert_sharding_error(num_experts, self.train.ep_size, experts_field=experts_field,
                                            ep_field="train.ep_size")
            require(problem is None, str(problem))
        if self.train.transport == "node_local":
            m = self.model
            require(m.moe_kind == "hierarchical",
                    f"train.transport='node_local' moves the patches of HierarchicalMoE blocks, but model.moe_kind="
                    f"{m.moe_kind!r}: set model.moe_kind=hierarchical (with model.hierarchical.placement=grouped), "
                    "or train.transport=flat")
            h = m.hierarchical_config()
            require(h.placement == "grouped",
                    f"train.transport='node_local' needs each group's experts on one node, but "
                    f"model.hierarchical.placement={h.placement!r} interleaves them over the ranks: set "
                    "model.hierarchical.placement=grouped, or train.transport=flat")
            require(h.fine.choice == "token",
                    "train.transport='node_local' routes each patch's fine slots on its group's node, but "
                    "model.hierarchical.fine.choice='expert' has the fine experts pick from the whole batch: set "
                    "model.hierarchical.fine.choice=token, or train.transport=flat")

    def ep_size_at(self, world_size: int, node_size: int) -> int:
        """The EP size of this run on ``world_size`` ranks in nodes of ``node_size`` (the launcher's
        LOCAL_WORLD_SIZE): ``train.ep_size``, or with ``train.elastic_ep`` the largest that fits, and with
        ``train.transport=node_local`` one that node-local transport can serve where there is one
        (whole nodes, every hierarchical group on one node: parallel/transport.py)."""
        tc, fits = self.train, None
        if tc.transport == "node_local":
            from parallel.transport import node_local_problem

            sizes = self.model.hierarchical_config().group_sizes

            def fits(p: int) -> bool:
                return node_local_problem(ep_size=p, node_size=node_size, world_size=world_size,
                                          group_sizes=sizes) is None
        return tc.ep_size_for(world_size, self.model.experts_gcd, fits)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out_dir, self.name)

    def to_dict(self) -> dict:
        return asdict(self)


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
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path!r} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path!r} must be a YAML mapping")
    base = data.pop("base", None)
    if base:
        base_path = os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            raise ConfigError(f"config {path!r} says base: {base}, but {base_path!r} does not exist (a base is "
                              "looked up beside the config that names it: copy it there or give its path)")
        data = _merge(load_yaml(base_path, _seen + (real,)), data)
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
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    return out


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """'line L, column C: problem' (1-based, as editors count) from a PyYAML error."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + problem


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    data = load_yaml(path) if path else {}
    return config_from_dict(apply_overrides(data, list(overrides)))


def config_from_dict(data: Mapping) -> RunConfig:
    """Defaults, overridden key by key (nested dicts merge) by ``data``."""
    try:
        return from_dict(RunConfig, _merge(asdict(RunConfig()), data))
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc

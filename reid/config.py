"""The model's and the data's configuration: typed, validated up front (see training/config.py for
the run configuration that holds them, YAML loading and ``key=value`` overrides)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from common.config import ConfigError, check_literals, from_dict, require
from moe.config import HierarchicalFusionConfig, HierarchicalMoEConfig, MultiScaleMoEConfig, PatchMoEConfig
from reid.synth import SynthSpec


@dataclass(frozen=True)
class DataConfig:
    """path: a dataset made by ``msmoe data`` (Arrow). source "synth" generates it there when
    missing (from ``synth``); "disk" requires it to exist (e.g. an imported RGBNT201)."""

    path: str = "data_cache/synth"
    source: Literal["synth", "disk"] = "synth"
    synth: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_literals(self, "data.")
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
    # "fused": the three stems' maps are summed before the backbone (one map per image);
    # "per_modality": each modality's map goes through the shared backbone on its own (the MoE
    # blocks route patches of one modality; hierarchical blocks with coarse_mode=given send them to
    # that modality's group) and the features are averaged over the modalities at the head
    streams: Literal["fused", "per_modality"] = "fused"
    # the head: "flat" - the thesis's multi-scale fusion (one gate over the 4/8/16 windows, exact);
    # "hierarchical" - per modality its scale experts and a fine gate over the scales, then a
    # cross-modal coarse gate over the modalities (needs streams=per_modality; moe/modal_fusion.py)
    fusion: Literal["flat", "hierarchical"] = "flat"
    hierarchical_fusion: dict = field(default_factory=dict)
    hierarchical: dict = field(default_factory=lambda: {
        "num_groups": 3, "experts_per_group": 3, "coarse": {"num_experts": 3, "top_k": 1},
        "fine": {"num_experts": 3, "top_k": 2}})

    def __post_init__(self) -> None:
        check_literals(self, "model.")
        require(self.dim >= 8 and self.dim % 2 == 0, f"model.dim={self.dim} must be an even number >= 8")
        require(self.stem_stride in (1, 2, 4, 8, 16), f"model.stem_stride={self.stem_stride} must be 1, 2, 4, 8 or 16")
        require(self.depth >= 1, f"model.depth={self.depth} must be >= 1")
        bad = [b for b in self.moe_blocks if not 0 <= b < self.depth]
        require(not bad, f"model.moe_blocks={list(self.moe_blocks)}: block(s) {bad} outside 0..{self.depth - 1}")
        require(self.kernel % 2 == 1, f"model.kernel={self.kernel} must be odd")
        require(self.mlp_ratio > 0, f"model.mlp_ratio={self.mlp_ratio} must be > 0")
        require(0 <= self.dropout < 1, f"model.dropout={self.dropout} must be in [0, 1)")
        require(self.fusion == "flat" or self.streams == "per_modality",
                "model.fusion='hierarchical' fuses the scales of each modality, then the modalities: it needs "
                "model.streams=per_modality (with fused streams there is one map per image)")
        self.patch_moe_config()
        self.multiscale_config()
        self.hierarchical_fusion_config()
        if self.moe_kind == "hierarchical":
            h = self.hierarchical_config()
            if h.coarse_mode == "given":
                require(self.streams == "per_modality",
                        "model.hierarchical.coarse_mode='given' routes each map to its modality's group: it needs "
                        "model.streams=per_modality (with fused streams a map mixes all modalities)")
                require(h.num_groups == 3, f"model.hierarchical.num_groups={h.num_groups} must be 3 (rgb, nir, tir) "
                        "with coarse_mode='given'")

    def patch_moe_config(self) -> PatchMoEConfig:
        data = dict(self.patch_moe)
        data.setdefault("dim", self.dim)
        require(data["dim"] == self.dim, f"model.patch_moe.dim={data['dim']} must equal model.dim={self.dim} (or be left out)")
        data.setdefault("expert", {"kind": "ffn", "hidden_dim": int(self.dim * self.mlp_ratio), "dropout": self.dropout})
        data.setdefault("pruned_output", "zero")  # the MoE sits in a residual branch: x + 0 leaves a pruned patch as it was
        return from_dict(PatchMoEConfig, data, "model.patch_moe")

    def multiscale_config(self) -> MultiScaleMoEConfig:
        data = dict(self.multiscale)
        data.setdefault("dim", self.dim)
        return from_dict(MultiScaleMoEConfig, data, "model.multiscale")

    def hierarchical_fusion_config(self) -> HierarchicalFusionConfig:
        """The hierarchical head; scales, gates and the experts' network as the flat fusion's unless given."""
        ms = self.multiscale_config()
        data = dict(self.hierarchical_fusion)
        data.setdefault("dim", self.dim)
        require(data["dim"] == self.dim,
                f"model.hierarchical_fusion.dim={data['dim']} must equal model.dim={self.dim} (or be left out)")
        for key in ("scales", "temperature", "gate_depth", "num_heads", "dropout"):
            data.setdefault(key, getattr(ms, key))
        data.setdefault("expert", {"kind": "seed", "hidden_dim": ms.expert_hidden, "dropout": ms.dropout})
        return from_dict(HierarchicalFusionConfig, data, "model.hierarchical_fusion")

    @property
    def expert_layers(self) -> dict[str, int]:
        """Expert count of every kind of expert-parallel layer, by the config field that sets it."""
        blocks = ("model.hierarchical experts (num_groups x experts_per_group)" if self.moe_kind == "hierarchical"
                  else "model.patch_moe.router.num_experts")
        out = {blocks: self.num_experts}
        if self.fusion == "hierarchical":
            out["model.hierarchical_fusion experts (modalities x scales x experts_per_cell)"] = \
                self.hierarchical_fusion_config().num_experts
        return out

    @property
    def experts_gcd(self) -> int:
        """The largest count every expert-parallel layer's expert count is a multiple of (EP sizes divide it)."""
        return math.gcd(*self.expert_layers.values())

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

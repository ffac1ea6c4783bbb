"""Typed, validated configuration of the MoE layers.

Every config is a frozen dataclass validated in ``__post_init__``: a bad value fails at build
time with a message that names the field, the value and what would be accepted. Mappings (YAML,
overrides) become configs through :func:`common.config.from_dict`, which checks every value's type
first (and a Literal field's value against its allowed values: ``check_literals`` does the same for a
config built in code).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

from common.config import check_literals, require
from moe.sharding import expert_sharding_error  # noqa: F401  (re-exported: parallel/, training/ import it here)

__all__ = ["BalanceConfig", "ExpertConfig", "HierarchicalFusionConfig", "HierarchicalMoEConfig",
           "MultiScaleMoEConfig", "PatchMoEConfig", "RouterConfig", "expert_sharding_error"]

ScoreFn = Literal["softmax", "sigmoid"]
NoiseKind = Literal["none", "gaussian", "jitter"]
ExpertKind = Literal["seed", "ffn", "conv"]
CapacityPriority = Literal["order", "score"]
RoutingChoice = Literal["token", "expert"]


@dataclass(frozen=True)
class RouterConfig:
    """How a routing unit (token or pooled patch) picks its experts.

    num_experts:      E, experts the router scores.
    top_k:            k, experts per unit (ignored when ``dynamic_top_p`` is set).
    score_fn:         "softmax" (scores sum to 1) or "sigmoid" (independent scores).
    temperature:      logits are divided by it before scoring (as the multi-scale fusion's gate).
    normalize_topk:   renormalise the selected weights to sum to 1.
    dynamic_top_p:    if set, dynamic k: the fewest experts whose scores reach p,
                      clamped to [k_min, k_max] (the thesis's DynamicMoE).
    num_heads:        gating heads whose scores are averaged (the multi-scale fusion's multi-head gate).
    gate_depth:       1 = one Linear (the Patch-MoE gate); 2 = the multi-scale fusion's GatingNetwork
                      (Linear-LN-GELU-Dropout-Linear); 3 = one more hidden block.
    gate_hidden:      hidden width of a deep gate (0 = input_dim // 2, as in the multi-scale fusion).
    gate_dropout:     dropout inside a deep gate (the multi-scale fusion uses 0.1).
    noise:            exploration in training only: "gaussian" adds N(0, noise_std) to the
                      logits, "jitter" multiplies the gate input by U(1-eps, 1+eps).
    bias_update_rate: aux-loss-free balancing: per-expert bias added to the selection
                      scores only, moved by this rate toward equal load (0 disables).
    choice:           "token": each unit picks its top_k experts (the default); "expert": each
                      expert picks the C units of the batch it scores highest (expert-choice
                      routing, moe/router.py ``expert_choice``), C = ceil(capacity_factor * N *
                      top_k / E): top_k keeps its meaning as expert passes per unit on average.
    """

    num_experts: int
    top_k: int = 2
    score_fn: ScoreFn = "softmax"
    temperature: float = 1.0
    normalize_topk: bool = True
    dynamic_top_p: float | None = None
    k_min: int = 1
    k_max: int | None = None
    num_heads: int = 1
    gate_depth: int = 1
    gate_hidden: int = 0
    gate_dropout: float = 0.0
    noise: NoiseKind = "none"
    noise_std: float = 1.0
    jitter_eps: float = 0.01
    bias_update_rate: float = 0.0
    choice: RoutingChoice = "token"

    def __post_init__(self) -> None:
        check_literals(self)
        e = self.num_experts
        require(isinstance(e, int) and e >= 1, f"num_experts={e!r} must be an integer >= 1")
        require(self.top_k >= 1, f"top_k={self.top_k} must be >= 1")
        require(
            self.top_k <= e,
            f"top_k={self.top_k} is larger than num_experts={e}: choose top_k <= {e}",
        )
        require(self.temperature > 0, f"temperature={self.temperature} must be > 0")
        require(self.num_heads >= 1, f"num_heads={self.num_heads} must be >= 1")
        require(self.gate_depth in (1, 2, 3), f"gate_depth={self.gate_depth} must be 1, 2 or 3")
        require(self.gate_hidden >= 0, f"gate_hidden={self.gate_hidden} must be >= 0")
        require(0 <= self.gate_dropout < 1, f"gate_dropout={self.gate_dropout} must be in [0, 1)")
        require(self.noise_std >= 0, f"noise_std={self.noise_std} must be >= 0")
        require(0 <= self.jitter_eps < 1, f"jitter_eps={self.jitter_eps} must be in [0, 1)")
        require(self.bias_update_rate >= 0, f"bias_update_rate={self.bias_update_rate} must be >= 0")
        if self.choice == "expert":
            require(self.dynamic_top_p is None,
                    f"dynamic_top_p={self.dynamic_top_p} needs choice='token': with choice='expert' the experts pick "
                    "their units, so a unit has no top-p of its own; unset dynamic_top_p")
            require(self.bias_update_rate == 0,
                    f"bias_update_rate={self.bias_update_rate} has no effect with choice='expert' (every expert takes "
                    "exactly C units, the load is balanced by construction); set it to 0")
        if self.dynamic_top_p is not None:
            p = self.dynamic_top_p
            require(0 < p <= 1, f"dynamic_top_p={p} must be in (0, 1]")
            require(
                self.score_fn == "softmax",
                f"dynamic_top_p needs score_fn='softmax' (got {self.score_fn!r}): "
                "top-p needs scores that sum to 1",
            )
            require(1 <= self.k_min <= e, f"k_min={self.k_min} must be in [1, num_experts={e}]")
            require(
                self.k_min <= self.max_k <= e,
                f"k_max={self.max_k} must be in [k_min={self.k_min}, num_experts={e}]",
            )

    @property
    def max_k(self) -> int:
        """K, the number of slots per unit (k_max for dynamic k, top_k otherwise)."""
        if self.dynamic_top_p is None:
            return self.top_k
        return self.k_max if self.k_max is not None else self.num_experts


@dataclass(frozen=True)
class BalanceConfig:
    """Coefficients of the auxiliary balance losses (0 turns one off; all are reported)."""

    load_balance_coef: float = 0.01  # Switch Transformer: E * sum_e f_e * P_e
    z_loss_coef: float = 0.0  # ST-MoE router z-loss: mean(logsumexp(logits)^2)
    variance_coef: float = 0.0  # the multi-scale fusion's: var(mean expert weights)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            require(v >= 0, f"{f.name}={v} must be >= 0")


@dataclass(frozen=True)
class ExpertConfig:
    """The experts' network.

    kind:       "seed"  - the thesis fusion's ExpertNetwork: Linear-LN-GELU-Dropout x2 + residual Linear;
                "ffn"   - Linear-GELU-Linear;
                "conv"  - spatial patch expert: 3x3 conv - GELU - 3x3 conv over the P x P patch
                          (needs patch routing).
    hidden_dim: F, the hidden width (the thesis fusion: 2 x model dim).
    dropout:    dropout inside the "seed" expert (the thesis fusion: 0.1).
    impl:       batched-matmul backend: "auto", "grouped_mm", "bmm" (see moe/grouped.py) or
                "fused": ffn experts as one function, a batched GEMM per bucket of experts with
                equal row counts, the bias inside, a hand-written backward (moe/fused_ffn.py);
                "auto" takes it for ffn experts on CPU. Other expert kinds treat "fused" as "auto".
    """

    kind: ExpertKind = "seed"
    hidden_dim: int = 1024
    dropout: float = 0.1
    impl: Literal["auto", "grouped_mm", "bmm", "fused"] = "auto"

    def __post_init__(self) -> None:
        check_literals(self, "expert.")
        require(self.hidden_dim >= 1, f"expert.hidden_dim={self.hidden_dim} must be >= 1")
        require(0 <= self.dropout < 1, f"expert.dropout={self.dropout} must be in [0, 1)")


@dataclass(frozen=True)
class PatchMoEConfig:
    """The thesis's Patch-MoE: one routing decision per P x P patch of a [B, H, W, C] map.

    dim:            C, channels of the feature map.
    patch_size:     P; 1 makes every point its own unit (token routing).
    pad_mode:       "pad": H or W not divisible by P is zero-padded up to a multiple of P,
                    the gate pools only the real points, the output is cropped back;
                    "error": refuse such maps.
    capacity_factor: None = dropless; else each expert takes at most
                    ceil(capacity_factor * units * K / E) units, the rest are dropped
                    (their slot contributes zero) and counted. With router.choice='expert' every
                    expert takes exactly that many (None means 1.0 there).
    capacity_priority: which units keep their slot when an expert overflows:
                    "order" (first units first, as Switch) or "score" (highest weight first).
    keep_fraction:  dual sparsity (from the thesis's Patch-MoE): a light scorer keeps ceil(keep_fraction * patches
                    per image) patches of each image; only those are routed and dispatched.
                    1.0 turns pruning off.
    pruned_output:  what a pruned patch's output is: "identity" (the input passes through
                    unchanged) or "zero" (for layers inside a residual branch: x + 0 = x).
    overlap_chunks: n > 1 pipelines the EP exchange in n chunks of local experts (parallel/overlap.py),
                    forward and backward; needs a static plan (router.choice='expert' or a capacity_factor)
                    and n dividing the experts per rank; one rank: nothing to overlap, no change.
    """

    dim: int
    router: RouterConfig
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    patch_size: int = 8
    pad_mode: Literal["pad", "error"] = "pad"
    capacity_factor: float | None = None
    capacity_priority: CapacityPriority = "order"
    keep_fraction: float = 1.0
    pruned_output: Literal["identity", "zero"] = "identity"
    overlap_chunks: int = 1

    def __post_init__(self) -> None:
        check_literals(self)
        require(self.dim >= 1, f"dim={self.dim} must be >= 1")
        require(isinstance(self.overlap_chunks, int) and self.overlap_chunks >= 1,
                f"overlap_chunks={self.overlap_chunks!r} must be an integer >= 1 (1: no pipelining)")
        if self.overlap_chunks > 1:
            require(self.router.choice == "expert" or self.capacity_factor is not None,
                    f"overlap_chunks={self.overlap_chunks} needs a static plan: set router.choice=expert or a "
                    "capacity_factor (dropless token choice learns its split sizes only at run time)")
            require(self.router.num_experts % self.overlap_chunks == 0,
                    f"overlap_chunks={self.overlap_chunks} must divide num_experts={self.router.num_experts}")
        require(0 < self.keep_fraction <= 1, f"keep_fraction={self.keep_fraction} must be in (0, 1] (1 = no pruning)")
        require(self.patch_size >= 1, f"patch_size={self.patch_size} must be >= 1")
        if self.capacity_factor is not None:
            require(
                self.capacity_factor > 0,
                f"capacity_factor={self.capacity_factor} must be > 0 (or null for dropless)",
            )
        if self.expert.kind == "conv":
            require(
                self.patch_size >= 2,
                f"expert.kind='conv' needs patch_size >= 2 (got {self.patch_size}): "
                "a spatial expert convolves inside the patch",
            )


@dataclass(frozen=True)
class HierarchicalMoEConfig:
    """Two-level MoE (see moe/hierarchical.py): G coarse groups (modalities), F_g fine experts in
    group g (scales), E = sum_g F_g experts in all, one decision per P x P patch.

    experts_per_group: F, the same for every group (an int), or one size per group (a list of G
                 ints, e.g. [8, 4, 4] for RGB 8, NIR 4, TIR 4): see ``group_sizes``.
    coarse:      router over the G groups (num_experts must be num_groups; top_k = coarse slots);
                 ignored when coarse_mode is "given" (the caller passes each image's group).
    fine:        the fine routers' settings; num_experts must be the largest group's size, and
                 group g's router is this one with num_experts = F_g. Every group has the same
                 fine slots, so fine.top_k (and fine.k_max with dynamic_top_p) must fit the
                 smallest group.
    placement:   "grouped" (a group's experts contiguous: on one rank / one node under EP) or
                 "spread" (interleaved over the ranks).
    capacity_factor: with fine.choice='expert' only: every fine expert takes C = ceil(capacity_factor
                 * N * Kc * Kf / E) of the (patch, coarse slot) pairs routed to its group (None: 1.0).
                 Token choice here is dropless and takes none.
    """

    dim: int
    coarse: RouterConfig
    fine: RouterConfig
    num_groups: int = 3
    experts_per_group: int | tuple[int, ...] = 3
    coarse_mode: Literal["learned", "given"] = "learned"
    placement: Literal["grouped", "spread"] = "grouped"
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    patch_size: int = 8
    pad_mode: Literal["pad", "error"] = "pad"
    capacity_factor: float | None = None

    def __post_init__(self) -> None:
        check_literals(self)
        require(self.dim >= 1, f"dim={self.dim} must be >= 1")
        require(self.coarse.choice == "token",
                "coarse.choice='expert' is not supported: expert choice applies to the fine level "
                "(fine.choice='expert'); the coarse level routes each patch to its groups")
        if self.capacity_factor is not None:
            require(self.fine.choice == "expert",
                    f"capacity_factor={self.capacity_factor} applies to fine.choice='expert' only (hierarchical "
                    "token choice is dropless); unset it or set fine.choice=expert")
            require(self.capacity_factor > 0, f"capacity_factor={self.capacity_factor} must be > 0")
        require(self.num_groups >= 1, f"num_groups={self.num_groups} must be >= 1")
        epg = self.experts_per_group
        if isinstance(epg, (tuple, list)):
            require(len(epg) == self.num_groups,
                    f"experts_per_group={list(epg)} lists {len(epg)} group sizes for num_groups={self.num_groups}: "
                    f"give one size per group (or one int for all)")
            require(all(isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in epg),
                    f"experts_per_group={list(epg)}: every group size must be an integer >= 1")
            object.__setattr__(self, "experts_per_group", tuple(epg))  # a list from code: hashable, as from YAML
        else:
            require(isinstance(epg, int) and not isinstance(epg, bool) and epg >= 1,
                    f"experts_per_group={epg!r} must be an integer >= 1 or a list of {self.num_groups} of them")
        sizes = self.group_sizes
        require(self.coarse.num_experts == self.num_groups,
                f"coarse.num_experts={self.coarse.num_experts} must equal num_groups={self.num_groups}")
        require(self.fine.num_experts == max(sizes),
                f"fine.num_experts={self.fine.num_experts} must equal "
                + (f"experts_per_group={epg}" if isinstance(epg, int) else
                   f"the largest group size max(experts_per_group={list(sizes)})={max(sizes)}: set "
                   f"fine.num_experts={max(sizes)} (group g's router then scores its own F_g experts)"))
        if min(sizes) < max(sizes):
            k_field = "fine.k_max" if self.fine.dynamic_top_p is not None else "fine.top_k"
            require(self.fine.max_k <= min(sizes),
                    f"{k_field}={self.fine.max_k} is larger than the smallest group "
                    f"(experts_per_group={list(sizes)}): every group's fine router takes the same slots; "
                    f"choose {k_field} <= {min(sizes)}")
        require(self.patch_size >= 1, f"patch_size={self.patch_size} must be >= 1")

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """(F_0, ..., F_{G-1}): the fine experts of every group."""
        epg = self.experts_per_group
        return tuple(epg) if isinstance(epg, tuple) else (epg,) * self.num_groups

    @property
    def num_experts(self) -> int:
        return sum(self.group_sizes)

    def fine_router(self, group: int) -> RouterConfig:
        """Group ``group``'s fine router: ``fine`` over its F_g experts."""
        f = self.group_sizes[group]
        return self.fine if f == self.fine.num_experts else replace(self.fine, num_experts=f)


@dataclass(frozen=True)
class MultiScaleMoEConfig:
    """The thesis's multi-scale MoE fusion (dense soft fusion of 4/8/16 windows: the baseline).

    dim:         D, channels of the feature map and of every scale's feature vector.
    scales:      window sizes; one expert per scale (thesis: 4, 8, 16).
    hidden_dim:  expert hidden width (thesis: 1024 for D=512, i.e. 2 x D).
    temperature: gating temperature (thesis: 1.0).
    gate_depth:  1, 2 (the thesis's GatingNetwork) or 3 Linear layers.
    num_heads:   the thesis's MultiHeadGatingNetwork heads (1 = the plain GatingNetwork).
    dropout:     dropout in experts and gate (thesis: 0.1).
    """

    dim: int
    scales: tuple[int, ...] = (4, 8, 16)
    hidden_dim: int = 0
    temperature: float = 1.0
    gate_depth: int = 2
    num_heads: int = 1
    dropout: float = 0.1
    balance: BalanceConfig = field(default_factory=lambda: BalanceConfig(0.0, 0.0, 0.0))

    def __post_init__(self) -> None:
        require(self.dim >= 1, f"dim={self.dim} must be >= 1")
        require(len(self.scales) >= 1, "scales must list at least one window size")
        require(all(s >= 1 for s in self.scales), f"scales={list(self.scales)} must all be >= 1")
        require(
            len(set(self.scales)) == len(self.scales),
            f"scales={list(self.scales)} has a repeated window size",
        )
        require(self.temperature > 0, f"temperature={self.temperature} must be > 0")
        require(self.gate_depth in (1, 2, 3), f"gate_depth={self.gate_depth} must be 1, 2 or 3")
        require(self.num_heads >= 1, f"num_heads={self.num_heads} must be >= 1")
        require(0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)")
        require(self.hidden_dim >= 0, f"hidden_dim={self.hidden_dim} must be >= 0")

    @property
    def expert_hidden(self) -> int:
        return self.hidden_dim or 2 * self.dim


@dataclass(frozen=True)
class HierarchicalFusionConfig:
    """The thesis's multi-scale fusion made hierarchical (see moe/modal_fusion.py): per modality, the
    window features of every scale go to that (modality, scale) cell's experts, a fine gate fuses
    the scales within the modality, a cross-modal coarse gate fuses the modalities.

    dim:               D, channels of the map and of every feature vector.
    scales:            window sizes (thesis: 4, 8, 16).
    num_modalities:    M (rgb, nir, tir: 3).
    experts_per_cell:  Ec experts per (modality, scale) cell; 1 = one expert per cell (dense).
    top_k:             experts each cell's router picks of its Ec (<= experts_per_cell).
    expert:            the experts' network (default: the thesis's ExpertNetwork, hidden 2 x dim).
    temperature, gate_depth, num_heads, dropout: the gates', as in the flat fusion.
    balance:           coefficients of the cell routers' balance losses (Ec > 1).
    """

    dim: int
    scales: tuple[int, ...] = (4, 8, 16)
    num_modalities: int = 3
    experts_per_cell: int = 1
    top_k: int = 1
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    temperature: float = 1.0
    gate_depth: int = 2
    num_heads: int = 1
    dropout: float = 0.1
    balance: BalanceConfig = field(default_factory=BalanceConfig)

    def __post_init__(self) -> None:
        require(self.dim >= 1, f"dim={self.dim} must be >= 1")
        require(len(self.scales) >= 1 and all(s >= 1 for s in self.scales),
                f"scales={list(self.scales)} must list window sizes >= 1")
        require(len(set(self.scales)) == len(self.scales), f"scales={list(self.scales)} has a repeated window size")
        require(self.num_modalities >= 1, f"num_modalities={self.num_modalities} must be >= 1")
        require(self.experts_per_cell >= 1, f"experts_per_cell={self.experts_per_cell} must be >= 1")
        require(1 <= self.top_k <= self.experts_per_cell,
                f"top_k={self.top_k} must be in [1, experts_per_cell={self.experts_per_cell}]")
        require(self.temperature > 0, f"temperature={self.temperature} must be > 0")
        require(self.gate_depth in (1, 2, 3), f"gate_depth={self.gate_depth} must be 1, 2 or 3")
        require(self.num_heads >= 1, f"num_heads={self.num_heads} must be >= 1")
        require(0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)")

    @property
    def num_cells(self) -> int:
        return self.num_modalities * len(self.scales)

    @property
    def num_experts(self) -> int:
        return self.num_cells * self.experts_per_cell

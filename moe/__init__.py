"""msmoe.moe: what a single rank computes (routers, experts, MoE layers).

Ranks are visible only through the dispatcher object a layer is handed.
"""

from moe.balance import MoEOutput, RoutingStats
from moe.config import (
    BalanceConfig,
    ExpertConfig,
    HierarchicalFusionConfig,
    HierarchicalMoEConfig,
    MultiScaleMoEConfig,
    PatchMoEConfig,
    RouterConfig,
)
from moe.dispatch import DispatchPlan, LocalDispatcher, plan_dispatch, unpermute
from moe.experts import ConvExperts, FFNExperts, ResidualMLPExperts, build_experts
from moe.hierarchical import HierarchicalMoE
from moe.modal_fusion import HierarchicalFusion
from moe.multiscale import MultiScaleMoE, window_features
from moe.patch_moe import PatchMoE
from moe.router import GateNetwork, Router, RoutingDecision

__all__ = [
    "BalanceConfig", "ConvExperts", "DispatchPlan", "ExpertConfig", "FFNExperts",
    "GateNetwork", "HierarchicalFusion", "HierarchicalFusionConfig", "HierarchicalMoE", "HierarchicalMoEConfig", "LocalDispatcher", "MoEOutput", "MultiScaleMoE", "MultiScaleMoEConfig",
    "PatchMoE", "PatchMoEConfig", "Router", "RouterConfig", "RoutingDecision", "RoutingStats",
    "ResidualMLPExperts", "build_experts", "plan_dispatch", "unpermute", "window_features",
]

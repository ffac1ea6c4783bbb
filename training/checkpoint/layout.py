"""How a checkpoint was saved, or how a run is laid out: EP size, world size, ZeRO stage.

The one definition of the ``layout`` a step's manifest records (training/checkpoint/manifest.py)
and of the layout keys of the client state (read back by training/checkpoint/elastic.py and
training/checkpoint/layout_check.py for older manifests)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    ep_size: int
    world_size: int
    zero_stage: int

    def __str__(self) -> str:
        return f"EP={self.ep_size} on {self.world_size} rank(s), ZeRO stage {self.zero_stage}"

    def as_manifest(self) -> dict:
        """The manifest's ``layout`` entry."""
        return {"ep_size": self.ep_size, "world_size": self.world_size, "zero_stage": self.zero_stage}

    def client_state(self) -> dict:
        """The layout keys of a checkpoint's client state (no ZeRO stage: DeepSpeed records it)."""
        return {"ep_size": self.ep_size, "world_size": self.world_size}

    @staticmethod
    def recorded_ep_size(entry: dict | None) -> int | None:
        """The EP size of a manifest's ``layout`` entry (None: absent, as in manifests written before
        it, or a tool that recorded no layout)."""
        ep = (entry or {}).get("ep_size")
        return int(ep) if ep is not None else None

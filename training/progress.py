"""The progress bar of a run (rank 0, tqdm): loss parts and throughput after every step."""

from __future__ import annotations

from tqdm import tqdm

from training.metrics import StepResult


class ProgressBar:
    def __init__(self, name: str, start: int, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=start, desc=f"train {name}", disable=not enabled, unit="step",
                        dynamic_ncols=True)

    def update(self, r: StepResult, samples_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{r.loss:.3f}", id=f"{r.id:.3f}", tri=f"{r.triplet:.3f}",
                             samples_s=f"{samples_per_s:.1f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

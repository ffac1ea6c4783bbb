"""The checkpointer the trainer calls: when to save (every ``train.ckpt_every`` steps, and at the
end), what goes with the weights (the run's state), and how a run continues from a checkpoint
(verified, resharded when the EP size changed: training/checkpoint/elastic.py).

Saving is atomic and collective (training/checkpoint/store.py): every rank calls it at the same steps."""

from __future__ import annotations

from collections.abc import Callable

from training.checkpoint import elastic, store
from training.checkpoint.layout import Layout
from training.faults import NO_FAULTS, FaultPlan


class Checkpointer:
    """Saves and loads one run's checkpoints in ``ckpt_dir``; ``state()`` returns what the run
    adds to the client state (progress, skipped steps, ...), read back by the caller on resume."""

    def __init__(self, engine, ckpt_dir: str, *, every: int, keep_last: int, layout: Layout, rank: int,
                 state: Callable[[], dict], faults: FaultPlan = NO_FAULTS, run_id: str = "") -> None:
        self.engine, self.ckpt_dir, self.every, self.keep_last = engine, ckpt_dir, every, keep_last
        self.layout, self.rank, self.state, self.faults, self.run_id = layout, rank, state, faults, run_id
        self.resharded: str | None = None  # set by resume: "resharded EP 4 -> 2"

    def maybe_save(self, step: int, end: int) -> None:
        """After step ``step``: a checkpoint at every ``every`` steps, but the last one (``end``),
        which :meth:`final_save` writes."""
        if step % self.every == 0 and step < end:
            self.save(step)

    def final_save(self, step: int, trained: bool) -> None:
        """At the end of a train() call; a call that trained nothing (a resume at its last step)
        leaves that step's checkpoint as it is."""
        if trained or not store.is_complete(self.ckpt_dir, step):
            self.save(step)

    def save(self, step: int) -> None:
        """Atomic: written by every rank, then committed by rank 0 (training/checkpoint/store.py)."""
        client = {"step": step, "run_id": self.run_id, **self.state(), **self.layout.client_state()}
        store.save(self.engine, self.ckpt_dir, step, client, self.keep_last, self.rank, self.layout.world_size,
                   self.faults, run_id=self.run_id, layout=self.layout.as_manifest())

    def resume(self, config_name: str) -> dict:
        """Load the newest complete checkpoint whose files match its manifest (all ranks agree on it
        before loading), resharded if it was saved at another EP size (``resharded`` then says so);
        returns its client state."""
        reshard = elastic.ElasticResume(self.layout, self.rank)
        client = store.resume(self.engine, self.ckpt_dir, config_name, rank=self.rank,
                              world_size=self.layout.world_size, prepare=reshard.prepare, loader=reshard.load)
        self.resharded = reshard.note
        return client

    def load_weights(self, ckpt_dir: str, config_name: str, what: str = "--init-from") -> int:
        """Weights only, of the newest verified step in ``ckpt_dir``; returns the step it was saved at."""
        step, _ = store.load_weights(self.engine, ckpt_dir, config_name, self.rank, self.layout.world_size, what)
        return step

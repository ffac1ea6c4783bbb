"""Checkpoints of a run: the store (save, commit, prune, verified resume), manifests, layouts,
the offline check, elastic resume and the checkpointer the trainer calls."""

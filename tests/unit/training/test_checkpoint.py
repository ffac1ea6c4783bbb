"""Checkpoint selection (training/checkpoint.py): complete ones only, pruning, by hand."""

import os

from training import checkpoint


def test_checkpoint_selection_ignores_incomplete_and_prunes(tmp_path):
    ck = str(tmp_path)
    for step, done in ((5, True), (10, True), (15, True), (20, False), (3, False)):
        os.makedirs(os.path.join(ck, checkpoint.tag_of(step)))
        if done:
            open(os.path.join(ck, checkpoint.tag_of(step), checkpoint.MARKER), "w").write(str(step))
    assert checkpoint.newest_complete(ck) == "step0000015"
    assert checkpoint.incomplete(ck) == ["step0000003", "step0000020"]
    assert sorted(checkpoint.prune(ck, keep_last=2)) == ["step0000003", "step0000005"]
    assert sorted(os.listdir(ck)) == ["step0000010", "step0000015", "step0000020"]  # the newer partial stays

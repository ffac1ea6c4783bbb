"""The ReID losses (reid/losses.py) against brute-force loops."""

import numpy as np
import pytest
import torch

from reid.losses import batch_hard_triplet, pairwise_distances


def test_triplet_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(8, 5, generator=g)
    pid = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])  # id 3 has no positive: left out
    d = torch.cdist(feat.double(), feat.double())
    losses = []
    for a in range(8):
        pos = [d[a, p] for p in range(8) if p != a and pid[p] == pid[a]]
        neg = [d[a, n] for n in range(8) if pid[n] != pid[a]]
        if pos and neg:
            losses.append(max(0.0, float(max(pos) - min(neg)) + 0.3))
    assert float(batch_hard_triplet(feat, pid, 0.3)) == pytest.approx(np.mean(losses), rel=1e-5)
    torch.testing.assert_close(pairwise_distances(feat, feat), d.float(), atol=1e-3, rtol=1e-4)

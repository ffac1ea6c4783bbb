"""Retrieval metrics against cases computed by hand."""

import numpy as np
import pytest

from reid.metrics import cosine_distance, evaluate


def test_camera_rule_and_ap_by_hand():
    # gallery:      g0         g1         g2         g3         g4         g5
    g_pids = np.array([1, 2, 1, 3, 1, 2])
    g_cams = np.array([0, 1, 1, 1, 2, 0])
    q_pids, q_cams = np.array([1, 2]), np.array([0, 1])
    dist = np.array([
        # q0 (id 1, cam 0): g0 is the same id under the same camera -> removed although closest.
        # Left: g5 (no), g1 (no), g2 (yes), g3 (no), g4 (yes) -> first hit rank 3; AP = (1/3 + 2/5) / 2
        [0.10, 0.25, 0.30, 0.40, 0.50, 0.20],
        # q1 (id 2, cam 1): g1 (id 2, cam 1) removed; g5 (id 2, cam 0) is closest -> AP 1, rank 1
        [0.90, 0.01, 0.80, 0.70, 0.60, 0.05],
    ])
    m = evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    ap0 = (1 / 3 + 2 / 5) / 2
    assert m.map == pytest.approx((ap0 + 1.0) / 2)
    assert m.rank(1) == pytest.approx(0.5)
    assert m.rank(2) == pytest.approx(0.5)
    assert m.rank(3) == pytest.approx(1.0)
    assert m.num_valid_queries == 2 and m.num_skipped_queries == 0


def test_query_whose_only_match_is_same_camera_is_skipped_and_counted():
    g_pids, g_cams = np.array([7, 8, 9]), np.array([0, 1, 1])
    q_pids, q_cams = np.array([7, 8]), np.array([0, 0])
    dist = np.array([[0.0, 0.5, 0.6], [0.3, 0.2, 0.1]])
    m = evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    # q0's only match (g0) shares its camera -> skipped. q1: g2 (no) then g1 (yes) -> rank 2, AP 1/2.
    assert m.num_skipped_queries == 1 and m.num_valid_queries == 1
    assert m.map == pytest.approx(0.5)
    assert m.rank(1) == 0.0 and m.rank(2) == 1.0


def test_without_camera_rule_the_junk_would_count():
    # the same data with every gallery camera distinct from the query's: g0 now counts, AP = 1
    g_pids, g_cams = np.array([7, 8, 9]), np.array([1, 1, 1])
    m = evaluate(np.array([[0.0, 0.5, 0.6]]), np.array([7]), g_pids, np.array([0]), g_cams)
    assert m.map == 1.0 and m.rank(1) == 1.0


def test_no_valid_query_is_an_error():
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate(np.zeros((1, 1)), [1], [1], [0], [0])


def test_cmc_is_monotone_and_perfect_features_score_one():
    rng = np.random.default_rng(0)
    pids = np.repeat(np.arange(10), 4)
    cams = np.tile(np.arange(4), 10)
    feats = np.eye(10)[pids] + 0.01 * rng.normal(size=(40, 10))
    m = evaluate(cosine_distance(feats, feats), pids, pids, cams, cams)
    assert m.map == pytest.approx(1.0) and m.rank(1) == 1.0
    rand = evaluate(rng.random((40, 40)), pids, pids, cams, cams)
    assert np.all(np.diff(rand.cmc) >= 0) and rand.map < 0.5

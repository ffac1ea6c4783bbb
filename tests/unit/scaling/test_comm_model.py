"""The two-level all-to-all model and its presets (scaling/comm_model.py) against the one-level model
and against bytes counted by hand, route by route, with msmoe's own CommCounter."""

import itertools

import pytest
import torch

from scaling.comm_model import (PRESETS, Exchange, Link, NodePreset, a2a_s, allreduce_s, exchanges, measured_preset,
                              parse_presets)
from scaling.points import AlphaBeta
from parallel.all_to_all import CommCounter


@pytest.mark.parametrize("ep,gpus_per_node", [(2, 2), (4, 2), (8, 8), (16, 4), (64, 8), (4, 1)])
def test_equal_levels_reduce_to_the_one_level_model(ep, gpus_per_node):
    alpha_s, beta = 37e-6, 1 / 3e9  # 37 us per peer, 3 GB/s
    ab = AlphaBeta(alpha_s, beta, 1, "")
    link = Link(alpha_s * 1e6, 8 / beta / 1e9)
    same = NodePreset("same", gpus_per_node, link, link, "test")
    for nbytes in (0.0, 1e3, 7.5e6):
        assert a2a_s(same, "flat", ep, nbytes) == pytest.approx(ab.a2a_s(ep, nbytes), rel=1e-12)
    # and the measured preset is exactly the fitted one-level model at any node size
    meas = measured_preset(alpha_s, beta)
    assert a2a_s(meas, "flat", ep, 2e6) == pytest.approx(ab.a2a_s(ep, 2e6), rel=1e-12)


def test_one_node_node_local_is_the_flat_exchange():
    p = PRESETS["h100-ndr"]
    assert exchanges("node-local", 8, 8, 8e6, fine_slots=2) == exchanges("flat", 8, 8, 8e6)
    assert a2a_s(p, "flat", 1, 1e9) == 0.0 and exchanges("flat", 1, 8, 1e9) == []


def test_bytes_per_level_by_hand_ep4_on_two_nodes_of_two():
    b = 4096.0
    # flat: a quarter of the rows stay on the rank, a quarter go to the other rank of the node,
    # half to the two ranks of the other node
    assert exchanges("flat", 4, 2, b) == [Exchange(1, 2, 1024.0, 2048.0)]
    # node-local, Kf = 2: stage 1 carries one row per coarse slot (b / 2), half of it to the other
    # node's entry rank (1 peer); stage 2 carries every fine slot (b), half to the node's other rank
    assert exchanges("node-local", 4, 2, b, fine_slots=2) == [Exchange(0, 1, 0.0, 1024.0), Exchange(1, 0, 2048.0, 0.0)]


def _enumerated_counts(row_bytes: int):
    """EP 4 = 2 nodes x 2 ranks, 2 experts per rank; group g = experts 4g..4g+3 on node g (grouped
    placement). Every rank routes one patch per (group, ordered pair of distinct fine experts):
    even routing, Kc = 1, Kf = 2. Count what rank 0 sends, with CommCounter, as the transports send it."""
    n, ranks = 2, [0, 1, 2, 3]
    routes = [(g, f1, f2) for g in (0, 1) for f1, f2 in itertools.permutations(range(4), 2)]
    x = torch.zeros(1, row_bytes // 4)  # one fp32 row of row_bytes

    def send(counter, splits, me=0):
        counter.record(x.expand(sum(splits), -1), splits, me, "forward", ranks)

    flat = CommCounter(node_size=n)
    splits = [0] * 4
    for g, *fs in routes:  # one-stage: every (patch, fine slot) row to its expert's rank
        for f in fs:
            splits[(4 * g + f) // 2] += 1
    send(flat, splits)
    stage1 = CommCounter(node_size=n)
    splits = [0] * 4
    for g, *_ in routes:  # to the entry rank of group g's node: the sender's local index (0) there
        splits[g * n + 0] += 1
    send(stage1, splits)
    stage2 = CommCounter(node_size=n)
    # rank 0 is the entry rank of node 0 for senders with local index 0: ranks 0 and 2, group 0 rows
    received = [r for sender in (0, 2) for r in routes if r[0] == 0]
    splits = [0] * 4
    for g, *fs in received:
        for f in fs:
            splits[(4 * g + f) // 2] += 1
    send(stage2, splits)
    return flat, stage1, stage2, len(routes) * 2 * row_bytes


def test_bytes_per_level_match_commcounter_on_enumerated_routes():
    row = 4 * 4 * 8 * 4  # P*P*C fp32, as tests/integration/test_node_transport.py
    flat, stage1, stage2, b = _enumerated_counts(row)
    (f,) = exchanges("flat", 4, 2, b)
    assert flat.cross_node_bytes == f.inter_bytes
    assert flat.offrank_bytes - flat.cross_node_bytes == f.intra_bytes
    s1, s2 = exchanges("node-local", 4, 2, b, fine_slots=2)
    assert stage1.cross_node_bytes == s1.inter_bytes and stage1.offrank_bytes == s1.inter_bytes
    assert stage2.cross_node_bytes == 0 and stage2.offrank_bytes == s2.intra_bytes
    assert 2 * stage1.cross_node_bytes == flat.cross_node_bytes  # Kf = 2: each remote group crosses once


def test_presets_and_their_validation():
    assert {"h100-ndr", "a100-hdr", "eth-100g"} <= set(PRESETS)
    h = PRESETS["h100-ndr"]
    assert (h.gpus_per_node, h.intra.bandwidth_gbps, h.inter.bandwidth_gbps) == (8, 3600.0, 400.0)
    assert "NVLink 4" in h.source and "NDR" in h.source and "nominal" in h.source
    assert PRESETS["a100-hdr"].inter.bandwidth_gbps == 200.0 and PRESETS["eth-100g"].inter.bandwidth_gbps == 12.5
    with pytest.raises(Exception):
        h.gpus_per_node = 4  # frozen
    assert parse_presets("h100-ndr, measured") == ["h100-ndr", "measured"]
    with pytest.raises(ValueError, match=r"--preset 'h100,a100-hdr': \['h100'\] is not a preset; choose from h100-ndr"):
        parse_presets("h100,a100-hdr")
    with pytest.raises(ValueError, match="EP size 12 is not a multiple of 8 GPUs per node"):
        exchanges("flat", 12, 8, 1e6)
    with pytest.raises(ValueError, match="placement 'spread'"):
        exchanges("spread", 4, 2, 1e6)


def test_h100_exchange_seconds_by_hand():
    # 16 GPUs = 2 nodes of 8, 16 MB handed in: 7 NVLink peers, 7/16 of it; 8 IB peers, 8/16 of it
    t = a2a_s(PRESETS["h100-ndr"], "flat", 16, 16e6)
    hand = 7 * 2e-6 + 16e6 * 7 / 16 * 8 / 3600e9 + 8 * 5e-6 + 16e6 * 8 / 16 * 8 / 400e9
    assert t == pytest.approx(hand, rel=1e-12)
    # ring all-reduce of 1 GB over 4 ranks on NDR: 6 steps of 250 MB
    assert allreduce_s(PRESETS["h100-ndr"].inter, 4, 1e9) == pytest.approx(6 * 5e-6 + 6 * 250e6 * 8 / 400e9)

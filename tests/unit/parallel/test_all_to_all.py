"""The differentiable all-to-all and its byte counter (parallel/all_to_all.py) among simulated ranks
in one process (tests/fake_dist.py): rows go to the rank their split names, in order; the backward
is the same exchange with the splits swapped; bytes are counted both ways, off-rank and across nodes.

Legend: P ranks, R rows a rank sends, U rows it receives, D values per row.
"""

import pytest
import torch
import torch.distributed as dist

from parallel.all_to_all import CollectiveError, CommCounter, all_to_all_rows, collective, exchange
from tests.fake_dist import run_ranks

P, D = 3, 2
SEND = [[1, 2, 0], [0, 1, 3], [2, 0, 1]]  # SEND[src][dst]: rows src sends to dst


def _rows(src: int) -> torch.Tensor:
    """Rank src's rows, each tagged with (src, dst, i) so where it lands says where it came from."""
    return torch.tensor([[100 * src + 10 * dst + i, src] for dst in range(P) for i in range(SEND[src][dst])],
                        dtype=torch.float32).view(-1, D)


def test_exchange_delivers_each_split_to_its_rank_in_order():
    def body(rank, group):
        recv = [SEND[src][rank] for src in range(P)]
        return exchange(_rows(rank), SEND[rank], recv, group)

    for rank, got in enumerate(run_ranks(P, body)):
        want = torch.cat([_rows(src)[sum(SEND[src][:rank]):sum(SEND[src][:rank + 1])] for src in range(P)])
        assert torch.equal(got, want)


def test_backward_is_the_reverse_exchange_and_bytes_are_counted_both_ways():
    counters = [CommCounter(node_size=2) for _ in range(P)]

    def body(rank, group):
        x = _rows(rank).requires_grad_(True)
        recv = [SEND[src][rank] for src in range(P)]
        y = all_to_all_rows(x, SEND[rank], recv, group, counters[rank], rank, list(range(P)))
        (y * (rank + 1)).sum().backward()  # gradient of a row: the receiving rank's factor
        return x.grad

    for src, g in enumerate(run_ranks(P, body)):
        factor = torch.cat([torch.full((SEND[src][dst], D), float(dst + 1)) for dst in range(P)])
        assert torch.equal(g, factor)
        c, row = counters[src], D * 4
        sent, got = sum(SEND[src]), sum(SEND[s][src] for s in range(P))
        assert c.calls == 2 and c.by_direction == {"forward": sent * row, "backward": got * row}
        assert c.total_bytes == (sent + got) * row
        assert c.offrank_bytes == (sent - SEND[src][src] + got - SEND[src][src]) * row
        node = src // 2  # nodes of 2 ranks: {0, 1}, {2}
        cross = sum(n for dst, n in enumerate(SEND[src]) if dst // 2 != node)
        cross += sum(SEND[s][src] for s in range(P) if s // 2 != node)
        assert c.cross_node_bytes == cross * row
    counters[0].reset()
    assert counters[0].total_bytes == counters[0].calls == 0 and counters[0].by_direction["forward"] == 0


def test_an_empty_rank_still_takes_part():
    def body(rank, group):
        send = [0, 0] if rank == 0 else [2, 1]
        recv = [0, 2] if rank == 0 else [0, 1]
        return exchange(torch.arange(sum(send) * D, dtype=torch.float32).view(-1, D), send, recv, group).shape[0]

    assert run_ranks(2, body) == [2, 1]


def test_a_failed_collective_is_named():
    def broken(*args, **kwargs):
        raise RuntimeError("Connection closed by peer\nmore detail")

    def body(rank, group):
        with pytest.raises(CollectiveError, match=r"collective 'counts' failed on rank 0: another rank died .*"
                                                  r"Cause: Connection closed by peer$"):
            collective("counts", broken)
        t = torch.tensor([1.0])
        collective("sum", dist.all_reduce, t, group=group)
        return float(t)

    assert run_ranks(1, body) == [1.0]

"""A two-level all-to-all cost model (links inside a node and between nodes) and named node presets.

Legend: P ranks in the EP group (consecutive global ranks), n ranks of the group per node
(n = min(gpus_per_node, P); P % n == 0), M = P / n nodes, B bytes this rank hands to the flat
(one-stage) all-to-all, Kf fine slots per coarse slot (the two-stage transport's saving).

Routing is taken as even: every expert receives the same share of the rows (the report prints
the measured load imbalance beside it). One exchange as one rank sees it:

  flat (one stage, parallel/all_to_all.py):
      intra: n - 1 peers, B * (n - 1) / P bytes      inter: P - n peers, B * (P - n) / P bytes
  node-local (two stages, parallel/node_transport.py):
      stage 1, one row per coarse slot to the entry rank of the node holding its group:
      intra: 0 peers, 0 bytes (the own node's entry rank is this rank)
      inter: M - 1 peers, B / Kf * (M - 1) / M bytes
      stage 2, inside the node, each row to its Kf fine experts:
      intra: n - 1 peers, B * (n - 1) / n bytes      inter: nothing

A level costs latency_us per peer plus bytes over its bandwidth; an exchange costs the sum of
its levels (no overlap between NVLink and the NIC assumed: conservative). With both levels equal
this is the one-level alpha-beta model of scaling/points.py: alpha * (P - 1) + beta * B * (P - 1) / P.
The split sizes and the two-stage transport's metadata (fine ids and weights) are folded into the
per-peer latency.

Presets are vendor peak figures per GPU and direction with nominal latencies (documented with
their sources in docs/PROJECTION.md); "measured" is the loopback fit of the points themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

PLACEMENTS = ("flat", "node-local")


@dataclass(frozen=True)
class Link:
    """One level of the network as one rank sees it."""

    latency_us: float  # per peer and exchange
    bandwidth_gbps: float  # per rank and direction, Gb/s; inf = free

    def seconds(self, peers: int, nbytes: float) -> float:
        bw_s = nbytes * 8 / (self.bandwidth_gbps * 1e9) if nbytes else 0.0
        return peers * self.latency_us * 1e-6 + bw_s


@dataclass(frozen=True)
class NodePreset:
    """A kind of node: how many GPUs share its fast links, and both levels' links."""

    name: str
    gpus_per_node: int
    intra: Link
    inter: Link
    source: str  # where the figures come from
    measured: bool = False  # fitted on this machine's points (loopback), not a vendor figure

    def exchange_s(self, ex: "Exchange") -> float:
        return self.intra.seconds(ex.intra_peers, ex.intra_bytes) + self.inter.seconds(ex.inter_peers, ex.inter_bytes)


@dataclass(frozen=True)
class Exchange:
    """One all-to-all as one rank sees it: peers and bytes inside its node and to other nodes."""

    intra_peers: int
    inter_peers: int
    intra_bytes: float
    inter_bytes: float


PRESETS = {
    "h100-ndr": NodePreset(
        "h100-ndr", 8, Link(2.0, 3600.0), Link(5.0, 400.0),
        "8x H100 SXM (DGX/HGX H100): NVLink 4, 900 GB/s per GPU both ways = 450 GB/s = 3600 Gb/s per direction; "
        "one ConnectX-7 NDR InfiniBand NIC per GPU, 400 Gb/s. Latencies nominal: 2 us (NVLink), 5 us (IB) per peer"),
    "a100-hdr": NodePreset(
        "a100-hdr", 8, Link(2.0, 2400.0), Link(5.0, 200.0),
        "8x A100 SXM (DGX A100): NVLink 3, 600 GB/s per GPU both ways = 300 GB/s = 2400 Gb/s per direction; "
        "one ConnectX-6 HDR InfiniBand NIC per GPU, 200 Gb/s. Latencies nominal: 2 us (NVLink), 5 us (IB) per peer"),
    "eth-100g": NodePreset(
        "eth-100g", 8, Link(3.0, 252.0), Link(10.0, 12.5),
        "8 PCIe GPUs per node, no NVLink: PCIe 4.0 x16, 31.5 GB/s = 252 Gb/s per direction; one 100 Gb/s "
        "Ethernet NIC (RoCE) per node shared by its 8 GPUs = 12.5 Gb/s each. Latencies nominal: 3 us (PCIe), "
        "10 us (RoCE) per peer"),
}
MEASURED = "measured"


def measured_preset(alpha_s: float, beta_s_per_byte: float) -> NodePreset:
    """This machine's fitted one-level model as a preset: both levels the same loopback link (one GPU
    per "node", so any EP size fits it)."""
    gbps = 8 / (beta_s_per_byte * 1e9) if beta_s_per_byte > 0 else float("inf")
    link = Link(alpha_s * 1e6, gbps)
    return NodePreset(MEASURED, 1, link, link,
                      "fitted on the measured points: gloo over this machine's loopback, one level (both the same)",
                      measured=True)


def parse_presets(spec: str) -> list[str]:
    """``--preset h100-ndr,measured`` -> names, each checked."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    known = [*PRESETS, MEASURED]
    bad = [s for s in names if s not in known]
    if bad or not names:
        raise ValueError(f"--preset {spec!r}: {bad or 'nothing'} is not a preset; choose from {', '.join(known)} "
                         "(comma list, e.g. --preset h100-ndr,a100-hdr)")
    return names


def parse_node(spec: str) -> NodePreset:
    """``--node NAME=GPUS,INTRA_US,INTRA_GBPS,INTER_US,INTER_GBPS`` -> a preset of the user's own."""
    usage = ("--node NAME=GPUS,INTRA_US,INTRA_GBPS,INTER_US,INTER_GBPS (GPUs per node; latency per peer in us and "
             "bandwidth per GPU and direction in Gb/s inside a node, then between nodes), e.g. --node ours=8,2,3000,6,350")
    name, _, rest = spec.partition("=")
    parts = rest.split(",")
    try:
        gpus, vals = int(parts[0]), [float(v) for v in parts[1:]]
    except ValueError:
        gpus, vals = 0, []
    if not name or name in PRESETS or name == MEASURED or len(vals) != 4 or gpus < 1 or min(vals) < 0 \
            or not (vals[1] > 0 and vals[3] > 0):
        why = "the name is a built-in preset's" if name in PRESETS or name == MEASURED else "expected"
        raise ValueError(f"--node {spec!r}: {why}: {usage}; bandwidths > 0")
    return NodePreset(name, gpus, Link(vals[0], vals[1]), Link(vals[2], vals[3]),
                      "given on the command line (--node): the user's figures")


def ranks_per_node(ep: int, gpus_per_node: int) -> int:
    """n: the EP group's ranks on one node (the group is consecutive ranks, filled node by node)."""
    n = min(gpus_per_node, ep)
    if ep % n:
        raise ValueError(f"EP size {ep} is not a multiple of {gpus_per_node} GPUs per node: "
                         "an EP group must fill whole nodes (or sit inside one)")
    return n


def exchanges(placement: str, ep: int, gpus_per_node: int, bytes_per_rank: float,
              fine_slots: int = 1) -> list[Exchange]:
    """The all-to-alls that replace one flat all-to-all of ``bytes_per_rank`` (see the module docstring)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: choose from {', '.join(PLACEMENTS)}")
    if fine_slots < 1:
        raise ValueError(f"fine slots {fine_slots}: must be >= 1 (the fine experts each coarse slot reaches)")
    p, b = ep, float(bytes_per_rank)
    if p <= 1:
        return []
    n = ranks_per_node(p, gpus_per_node)
    m = p // n
    if placement == "flat":
        return [Exchange(n - 1, p - n, b * (n - 1) / p, b * (p - n) / p)]
    stage1 = Exchange(0, m - 1, 0.0, b / fine_slots * (m - 1) / m)
    stage2 = Exchange(n - 1, 0, b * (n - 1) / n, 0.0)
    return [stage1, stage2] if m > 1 else [stage2]


def a2a_s(preset: NodePreset, placement: str, ep: int, bytes_per_rank: float, fine_slots: int = 1) -> float:
    """Modelled seconds of one all-to-all (flat) or its two stages (node-local) for one rank."""
    return sum(preset.exchange_s(ex) for ex in exchanges(placement, ep, preset.gpus_per_node, bytes_per_rank,
                                                         fine_slots))


def allreduce_s(link: Link, replicas: int, nbytes: float) -> float:
    """Ring all-reduce of ``nbytes`` over ``replicas`` ranks on one link: 2 (r - 1) steps of nbytes / r."""
    if replicas <= 1 or not nbytes:
        return 0.0
    steps = 2 * (replicas - 1)
    return link.seconds(steps, nbytes * steps / replicas)

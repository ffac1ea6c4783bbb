"""An emulated cluster's network on one machine (issue 28, item 3): N "node" network namespaces
joined through one "switch" namespace, one veth pair per node, each node's link shaped with
``tc qdisc ... tbf`` on both ends of its veth (tbf shapes egress only).

Inside the switch namespace the node links are joined by a Linux bridge (``mode="bridge"``); where
``ip link add ... type bridge`` is refused, the switch routes between them instead
(``mode="route"``: ip_forward on in the switch namespace alone, each node a /32 behind it).
``mode="auto"`` takes the bridge when it can.

Nothing outside the namespaces made here is touched: each veth pair is created inside the switch
namespace with its peer put straight into its node namespace, the addresses are 10.79.0.0/24 and
exist only inside them. Namespace names are ``<prefix>-sw`` and ``<prefix>-n<i>``, the prefix
``msmoe-c<pid>-<k>`` by default, so that :func:`cleanup_stale` can tell the namespaces of a killed
earlier run (its pid dead) from anything else. Needs root; :func:`available` says why not."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess

PREFIX_ROOT = "msmoe-c"
SUBNET = "10.79.0"
SWITCH_ADDR = f"{SUBNET}.254"  # the switch's side of every node link (route mode only)
NODE_IFNAME = "eth0"  # the node side of its veth, the same name in every node
_count = itertools.count()


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def available() -> str | None:
    """None where an emulated cluster can be built here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` binary (iproute2; .ci/system-deps installs it)"
    probe = f"{PREFIX_ROOT}{os.getpid()}-probe"
    done = _run(["ip", "netns", "add", probe], check=False)
    if done.returncode != 0:
        return f"`ip netns add` refused: {done.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def bridge_works() -> bool:
    """Whether ``ip link add ... type bridge`` works in a fresh namespace of this machine."""
    probe = f"{PREFIX_ROOT}{os.getpid()}-brprobe"
    _run(["ip", "netns", "add", probe])
    try:
        return _run(["ip", "-n", probe, "link", "add", "br0", "type", "bridge"], check=False).returncode == 0
    finally:
        _run(["ip", "netns", "del", probe], check=False)


def list_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix_root: str = PREFIX_ROOT) -> list[str]:
    """Delete the namespaces a killed earlier run of this harness left: only names
    ``<prefix_root><pid>-...`` (or exactly ``<prefix_root><pid>``) whose pid is dead. Returns them."""
    pattern = re.compile(rf"^{re.escape(prefix_root)}(\d+)(-|$)")
    removed = []
    for name in list_namespaces():
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed


def tbf_args(rate_mbit: float) -> list[str]:
    """tbf parameters for ``rate_mbit``: a bucket of 5 ms at that rate but at least 70 KB (a 64 KB
    GSO segment must fit in it), a queue of 100 ms."""
    burst = max(70 * 1024, int(rate_mbit * 1e6 / 8 * 0.005))
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "100ms"]


class EmulatedCluster:
    """``with EmulatedCluster(3, 100.0) as c: c.exec_argv(0, [...])``: nodes 0..N-1 at
    ``c.addresses[i]`` on interface ``c.ifnames[i]`` (for GLOO_SOCKET_IFNAME) in namespace
    ``c.namespaces[i]``; ``rate_mbit=None`` leaves the links unshaped."""

    def __init__(self, nodes: int, rate_mbit: float | None, prefix: str | None = None, mode: str = "auto"):
        if not 1 <= nodes <= 250:
            raise ValueError(f"nodes must be in 1..250, got {nodes}")
        if mode not in ("auto", "bridge", "route"):
            raise ValueError(f"mode must be auto, bridge or route, got {mode!r}")
        self.nodes, self.rate_mbit, self.requested_mode = nodes, rate_mbit, mode
        self.prefix = prefix or f"{PREFIX_ROOT}{os.getpid()}-{next(_count)}"
        self.switch = f"{self.prefix}-sw"
        self.namespaces = [f"{self.prefix}-n{i}" for i in range(nodes)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(nodes)]
        self.ifnames = [NODE_IFNAME] * nodes
        self.switch_ports = [f"s{i}" for i in range(nodes)]
        self.mode: str | None = None  # bridge or route, once built
        self._made: list[str] = []

    # ---- use
    def exec_argv(self, node: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[node], *argv]

    def all_namespaces(self) -> list[str]:
        return [self.switch, *self.namespaces]

    # ---- build and tear down
    def __enter__(self) -> EmulatedCluster:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _netns_add(self, name: str) -> None:
        if name in list_namespaces():
            raise RuntimeError(f"network namespace {name} exists already (another cluster with prefix {self.prefix}?)")
        _run(["ip", "netns", "add", name])
        self._made.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _build(self) -> None:
        sw = self.switch
        for name in self.all_namespaces():
            self._netns_add(name)
        mode = self.requested_mode
        if mode in ("auto", "bridge"):
            made = _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge", "forward_delay", "0"],
                        check=mode == "bridge")
            mode = "bridge" if made.returncode == 0 else "route"
        self.mode = mode
        if mode == "bridge":
            _run(["ip", "-n", sw, "link", "set", "br0", "up"])
        else:
            _run(["ip", "netns", "exec", sw, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        for i, (ns, port, addr) in enumerate(zip(self.namespaces, self.switch_ports, self.addresses)):
            _run(["ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", NODE_IFNAME, "netns", ns])
            if mode == "bridge":
                _run(["ip", "-n", sw, "link", "set", port, "master", "br0"])
                _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", NODE_IFNAME])
            else:
                _run(["ip", "-n", sw, "addr", "add", f"{SWITCH_ADDR}/32", "dev", port])
                _run(["ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", NODE_IFNAME])
            _run(["ip", "-n", sw, "link", "set", port, "up"])
            _run(["ip", "-n", ns, "link", "set", NODE_IFNAME, "up"])
            if mode == "route":
                _run(["ip", "-n", sw, "route", "add", f"{addr}/32", "dev", port])
                _run(["ip", "-n", ns, "route", "add", SWITCH_ADDR, "dev", NODE_IFNAME])
                _run(["ip", "-n", ns, "route", "add", f"{SUBNET}.0/24", "via", SWITCH_ADDR])
            if self.rate_mbit is not None:
                shape = tbf_args(self.rate_mbit)
                _run(["tc", "-n", ns, "qdisc", "add", "dev", NODE_IFNAME, "root", *shape])
                _run(["tc", "-n", sw, "qdisc", "add", "dev", port, "root", *shape])

    def close(self) -> None:
        """Delete every namespace this cluster made (their veths go with them); idempotent."""
        while self._made:
            _run(["ip", "netns", "del", self._made.pop()], check=False)

"""One real torchrun agent per emulated node (issue 28, item 3): started inside the node's network
namespace (``ip netns exec``), a c10d rendezvous hosted by node 0's agent on node 0's address, each
agent's output in its own log file, and a whole node killable (its agent, its workers and anything
they started: every process inside the node's namespace).

  with EmulatedCluster(2, 200.0) as net, Agents(net, AgentSpec(2, ("train.py", "--steps", "10")),
                                                 log_dir="runs/logs") as agents:
      codes = agents.wait(timeout_s=600)      # one exit status per node; raises AgentsFailed otherwise

(msmoe's own commands come as a target from launcher/command.py.) ``AgentSpec.nnodes="1:2"`` with ``max_restarts`` makes the rendezvous elastic: after
``agents.kill_node(1)`` the survivors' workers fail in their next collective, their agents restart
them and the rendezvous closes at the smaller node count. Leaving the ``with`` block (normally, on an
error, on KeyboardInterrupt) kills every node's processes and reaps the agents; the network's own
``with`` then deletes the namespaces.

The node's interface (``eth0`` in every node) is named to gloo and NCCL, and the agent's
``--local_addr`` is the node's own address: without it torchrun hands its workers the machine's
hostname as MASTER_ADDR, which no namespace can reach.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from cluster.netns import EmulatedCluster
from parallel.launchenv import torchrun_command

RDZV_PORT = 29400
_PR_SET_PDEATHSIG = 1


class AgentsFailed(RuntimeError):
    """An agent ended with a non-zero status (or the agents ran past their time); names the nodes and
    ends with each one's log tail."""


@dataclass(frozen=True)
class AgentSpec:
    """What each node's agent runs. ``target``: ``("-m", module, args...)`` or ``(script, args...)``.
    ``nnodes``: None for exactly the cluster's node count, or
    ``"MIN:MAX"`` for an elastic rendezvous. Either way the c10d rendezvous numbers the nodes in the
    order of their addresses (torchrun's --node_rank is ignored with c10d): node i gets ranks
    ``i * nproc_per_node ...`` for up to 9 nodes (10.79.0.10 would sort before 10.79.0.2). It waits
    ``last_call_s`` for more nodes once MIN have joined, and drops a node whose agent missed
    ``keep_alive_attempts`` heartbeats ``keep_alive_s`` apart."""

    nproc_per_node: int
    target: tuple[str, ...]
    nnodes: str | None = None
    max_restarts: int = 0
    rdzv_port: int = RDZV_PORT
    rdzv_id: str = "msmoe-cluster"
    last_call_s: int = 5
    keep_alive_s: int = 1
    keep_alive_attempts: int = 3
    join_timeout_s: int = 300
    monitor_interval_s: float = 0.5
    python: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # on top of the caller's environment


def _die_with_parent() -> None:  # between fork and exec: the agent gets SIGKILL should this process die
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def namespace_pids(namespace: str) -> list[int]:
    """Every process inside network namespace ``namespace`` (``ip netns pids``)."""
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


class Agents:
    """The agents of one job on an :class:`EmulatedCluster`; see the module docstring."""

    def __init__(self, net: EmulatedCluster, spec: AgentSpec, log_dir: str, env: Mapping[str, str] | None = None,
                 cwd: str | None = None):
        self.net, self.spec, self.log_dir, self.cwd = net, spec, log_dir, cwd
        self.base_env = dict(os.environ if env is None else env)
        self.procs: list[subprocess.Popen | None] = [None] * net.nodes
        self.killed: set[int] = set()
        self.log_paths = [os.path.join(log_dir, f"node{i}.log") for i in range(net.nodes)]

    # ---- commands
    def endpoint(self) -> str:
        return f"{self.net.addresses[0]}:{self.spec.rdzv_port}"

    def rdzv_conf(self, node: int) -> str:
        s = self.spec
        return (f"is_host={int(node == 0)},last_call_timeout={s.last_call_s},join_timeout={s.join_timeout_s},"
                f"keep_alive_interval={s.keep_alive_s},keep_alive_max_attempt={s.keep_alive_attempts}")

    def command(self, node: int) -> list[str]:
        """The agent's command line as run inside node ``node``'s namespace."""
        s = self.spec
        options = [f"--local_addr={self.net.addresses[node]}", f"--rdzv_conf={self.rdzv_conf(node)}",
                   f"--max-restarts={s.max_restarts}", f"--monitor-interval={s.monitor_interval_s}"]
        agent = torchrun_command(s.nproc_per_node, list(s.target), python=s.python,
                                 nnodes=s.nnodes or self.net.nodes,
                                 rdzv_endpoint=self.endpoint(), rdzv_id=s.rdzv_id, options=options)
        return self.net.exec_argv(node, agent)

    def node_env(self, node: int) -> dict[str, str]:
        ifname = self.net.ifnames[node]
        return {**self.base_env, **self.spec.env, "GLOO_SOCKET_IFNAME": ifname, "NCCL_SOCKET_IFNAME": ifname}

    # ---- run
    def __enter__(self) -> Agents:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> Agents:
        os.makedirs(self.log_dir, exist_ok=True)
        for node in range(self.net.nodes):
            with open(self.log_paths[node], "w") as log:
                self.procs[node] = subprocess.Popen(self.command(node), stdout=log, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, env=self.node_env(node), cwd=self.cwd,
                                                    start_new_session=True, preexec_fn=_die_with_parent)
        return self

    def poll(self) -> list[int | None]:
        return [p.poll() if p is not None else None for p in self.procs]

    def wait(self, timeout_s: float, grace_s: float = 30.0) -> list[int | None]:
        """Wait for every agent not killed; returns each node's exit status (a killed node's is its
        signal, negative). An agent that fails gives the others ``grace_s`` to end too, then every
        node is killed and :class:`AgentsFailed` raised; so it is past ``timeout_s``."""
        deadline, failed_at = time.monotonic() + timeout_s, None
        while True:
            codes = self.poll()
            live = [i for i, c in enumerate(codes) if c is None and i not in self.killed]
            bad = [i for i, c in enumerate(codes) if c not in (None, 0) and i not in self.killed]
            if bad and failed_at is None:
                failed_at = time.monotonic()
            if not live:
                break
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now > failed_at + grace_s):
                self.kill_all()
                raise AgentsFailed(self._failure("ran past their time" if not bad else "failed", live, bad))
            time.sleep(0.2)
        if bad:
            raise AgentsFailed(self._failure("failed", [], bad))
        return codes

    def kill_node(self, node: int, timeout_s: float = 10.0) -> list[int]:
        """SIGKILL every process inside node ``node`` (the agent, its workers, their children) until none
        is left, and reap its agent; returns the pids killed."""
        self.killed.add(node)
        killed: list[int] = []
        deadline = time.monotonic() + timeout_s
        while pids := namespace_pids(self.net.namespaces[node]):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node}: processes {pids} still alive {timeout_s}s after SIGKILL")
            time.sleep(0.05)
        if self.procs[node] is not None:
            self.procs[node].wait()
        return sorted(set(killed))

    def kill_all(self) -> None:
        for node in range(self.net.nodes):
            if self.procs[node] is not None:
                self.kill_node(node)

    def close(self) -> None:
        """Kill whatever still runs on any node and reap the agents; idempotent."""
        for node, proc in enumerate(self.procs):
            if proc is None:
                continue
            if proc.poll() is None or namespace_pids(self.net.namespaces[node]):
                self.kill_node(node)
            proc.wait()

    # ---- logs
    def log(self, node: int) -> str:
        try:
            with open(self.log_paths[node], errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def _failure(self, what: str, live: Sequence[int], bad: Sequence[int]) -> str:
        codes = self.poll()
        lines = [f"agents {what}: " + ", ".join(f"node {i}: {'still running, killed' if i in live else codes[i]}"
                                                for i in range(self.net.nodes))]
        for i in range(self.net.nodes):
            lines.append(f"---- node {i} ({self.log_paths[i]}), last lines:\n{self.log(i)[-3000:]}")
        return "\n".join(lines)

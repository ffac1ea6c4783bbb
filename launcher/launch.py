"""``msmoe launch``: the same training job under any launcher, on one node or many.

  msmoe launch --launcher torchrun --nproc-per-node 2 -- --config configs/default.yaml
  msmoe launch --launcher deepspeed --nproc-per-node 2 -- --config configs/default.yaml
  msmoe launch --launcher mpirun --nproc-per-node 2 -- --config configs/default.yaml
  msmoe launch --launcher accelerate --nproc-per-node 2 -- --config configs/default.yaml
  msmoe launch --launcher torchrun --nnodes 4 --nproc-per-node 8 --master-addr node0 --dry-run -- --config configs/gpu.yaml

Everything after ``--`` goes to ``msmoe train``. ``--dry-run`` prints the command(s) instead of
running them: for torchrun and accelerate one line per node (run each on its node), for the
deepspeed launcher and mpirun one line for the first node, which starts the others itself
(over ssh, from the hostfile it writes).

  torchrun     c10d rendezvous on --master-addr:--master-port, id --job-id
  deepspeed    a DeepSpeed hostfile ("host slots=G" per node) and --num_nodes/--num_gpus
  mpirun       MPICH/Hydra (-ppn, -f hostfile) or Open MPI (--npernode, --hostfile);
               ranks are discovered through mpi4py
  accelerate   configs/accelerate/deepspeed.yaml (DeepSpeed plugin), machine rank per node
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass

from common.errors import UserError
from launcher.command import CLI_MODULE, msmoe_command

LAUNCHERS = ("torchrun", "deepspeed", "mpirun", "accelerate")
ACCELERATE_CONFIG = "configs/accelerate/deepspeed.yaml"


class LaunchError(UserError, ValueError):
    """A launch request that cannot work; the message names the setting and the fix."""


@dataclass(frozen=True)
class LaunchSpec:
    launcher: str
    nnodes: int = 1
    nproc_per_node: int = 1
    hosts: tuple[str, ...] = ()  # from --hostfile; hosts[0] is the first node
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    job_id: str = "msmoe"
    python: str = "python"
    hostfile_path: str = "hostfile"
    mpi_flavor: str = "mpich"  # or "openmpi"
    device: str = "cpu"

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def read_hostfile(path: str) -> list[str]:
    """Host names, one per line; "host slots=N" (DeepSpeed/Open MPI) and "host:N" (MPICH) accepted."""
    if not os.path.isfile(path):
        raise LaunchError(f"--hostfile {path!r} does not exist")
    hosts = []
    with open(path) as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if line:
                hosts.append(line.split()[0].split(":")[0])
    if not hosts:
        raise LaunchError(f"--hostfile {path!r} names no hosts")
    return hosts


def check_hosts_reachable(hosts: list[str]) -> None:
    bad = []
    for h in hosts:
        try:
            socket.getaddrinfo(h, None)
        except OSError as exc:
            bad.append(f"{h} ({exc.strerror or exc})")
    if bad:
        raise LaunchError(f"hostfile names host(s) that do not resolve: {', '.join(bad)}; fix the names or "
                          "the DNS / /etc/hosts entries")


def check_environment(environ: dict | None = None) -> None:
    from parallel.launchenv import launcher_vars

    env = os.environ if environ is None else environ
    found = launcher_vars(env)
    if found:
        raise LaunchError(
            f"msmoe launch was started inside another launcher ({', '.join(f'{v}={env[v]}' for v in found)}): "
            "run `msmoe train` directly there, or unset these variables")


def check_devices(spec: LaunchSpec, cuda_count: int | None = None) -> None:
    """``--nproc-per-node`` at most the CUDA devices present (``cuda_count``; None: ask torch)."""
    from parallel.devices import check_gpu_count, cuda_device_count

    if spec.device != "cuda":
        return
    check_gpu_count(spec.nproc_per_node, "--nproc-per-node", "--device cpu",
                    cuda_device_count if cuda_count is None else cuda_count)


def build_commands(spec: LaunchSpec, train_args: list[str]) -> list[list[str]]:
    """The command line(s) for ``spec``: one per node for torchrun/accelerate, one for the others."""
    if spec.launcher not in LAUNCHERS:
        raise LaunchError(f"--launcher {spec.launcher!r} is not one of {list(LAUNCHERS)}")
    if spec.nnodes < 1 or spec.nproc_per_node < 1:
        raise LaunchError(f"--nnodes {spec.nnodes} and --nproc-per-node {spec.nproc_per_node} must be >= 1")
    if spec.hosts and len(spec.hosts) < spec.nnodes:
        raise LaunchError(f"--nnodes {spec.nnodes} but the hostfile names only {len(spec.hosts)} host(s)")
    if spec.nnodes > 1 and not spec.hosts and spec.master_addr in ("127.0.0.1", "localhost"):
        raise LaunchError(f"--nnodes {spec.nnodes}: give --master-addr (the first node's address) or --hostfile")
    g, n = spec.nproc_per_node, spec.nnodes
    master = spec.hosts[0] if spec.hosts else spec.master_addr
    train = ["train", *train_args]
    if spec.launcher == "torchrun":
        if n == 1:
            return [msmoe_command(train, nproc=g, python=spec.python)]
        return [msmoe_command(train, nproc=g, python=spec.python, nnodes=n, node_rank=r,
                              rdzv_endpoint=f"{master}:{spec.master_port}", rdzv_id=spec.job_id) for r in range(n)]
    if spec.launcher == "deepspeed":
        cmd = ["deepspeed", f"--num_nodes={n}", f"--num_gpus={g}", f"--master_port={spec.master_port}", "--no_local_rank"]
        if n > 1 or spec.hosts:
            cmd += [f"--hostfile={spec.hostfile_path}", f"--master_addr={master}"]
        return [cmd + ["--module", CLI_MODULE, *train]]
    if spec.launcher == "mpirun":
        cmd = ["mpirun", "-np", str(spec.world_size)]
        if spec.mpi_flavor == "openmpi":
            cmd += ["--npernode", str(g)] + (["--hostfile", spec.hostfile_path] if n > 1 or spec.hosts else [])
        else:
            cmd += ["-ppn", str(g)] + (["-f", spec.hostfile_path] if n > 1 or spec.hosts else [])
        if spec.mpi_flavor == "openmpi":
            env = ["-x", f"MASTER_PORT={spec.master_port}"]
        else:
            env = ["-genv", "MASTER_PORT", str(spec.master_port)]
        return [cmd + env + msmoe_command(train, python=spec.python)]
    # accelerate: one line per machine
    return [["accelerate", "launch", "--config_file", ACCELERATE_CONFIG, f"--num_machines={n}",
             f"--num_processes={spec.world_size}", f"--machine_rank={r}", f"--main_process_ip={master}",
             f"--main_process_port={spec.master_port}", "-m", CLI_MODULE, *train] for r in range(n)]


def hostfile_text(spec: LaunchSpec) -> str:
    hosts = list(spec.hosts) or ["localhost"]
    if spec.launcher == "mpirun" and spec.mpi_flavor == "mpich":
        return "".join(f"{h}:{spec.nproc_per_node}\n" for h in hosts[:spec.nnodes])
    return "".join(f"{h} slots={spec.nproc_per_node}\n" for h in hosts[:spec.nnodes])


def render(spec: LaunchSpec, commands: list[list[str]]) -> str:
    lines = []
    if spec.launcher in ("deepspeed", "mpirun") and (spec.nnodes > 1 or spec.hosts):
        lines.append(f"# {spec.hostfile_path}:")
        lines += [f"#   {h}" for h in hostfile_text(spec).splitlines()]
    for i, cmd in enumerate(commands):
        if len(commands) > 1:
            lines.append(f"# node {i}:")
        lines.append(shlex.join(cmd))
    return "\n".join(lines) + "\n"


def detect_mpi_flavor(mpirun: str = "mpirun") -> str:
    exe = shutil.which(mpirun) or os.path.join(os.path.dirname(sys.executable), mpirun)
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
    except OSError:
        return "mpich"
    return "openmpi" if "Open MPI" in out or "OpenRTE" in out else "mpich"


def add_parser(sub) -> None:
    p = sub.add_parser("launch", help="run msmoe train under torchrun / deepspeed / mpirun / accelerate",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launcher", required=True, choices=LAUNCHERS)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--hostfile", default=None, help="hosts, one per line (first = master)")
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--job-id", default="msmoe", help="torchrun rendezvous id")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--mpi", choices=["auto", "mpich", "openmpi"], default="auto", help="MPI flavour of mpirun")
    p.add_argument("--dry-run", action="store_true", help="print the command(s), run nothing")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then msmoe train arguments")
    p.set_defaults(func=run_launch)


def spec_from_args(args) -> tuple[LaunchSpec, list[str]]:
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    hosts: tuple[str, ...] = ()
    if args.hostfile:
        hosts = tuple(read_hostfile(args.hostfile))
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    flavor = args.mpi if args.mpi != "auto" else (detect_mpi_flavor() if args.launcher == "mpirun" else "mpich")
    python = "python" if args.dry_run else sys.executable
    spec = LaunchSpec(args.launcher, args.nnodes, args.nproc_per_node, hosts, args.master_addr, args.master_port,
                      args.job_id, python, "hostfile", flavor, device)
    return spec, train_args


def run_launch(args) -> int:
    spec, train_args = spec_from_args(args)
    commands = build_commands(spec, train_args)
    if args.dry_run:
        sys.stdout.write(render(spec, commands))
        return 0
    check_environment()
    check_devices(spec)
    if spec.hosts:
        check_hosts_reachable(list(spec.hosts[:spec.nnodes]))
    if len(commands) > 1:
        raise LaunchError(f"{spec.launcher} needs one command per node: run `msmoe launch ... --dry-run` and start "
                          "each line on its node (or use --launcher deepspeed/mpirun, or `msmoe submit` on SLURM)")
    if spec.launcher in ("deepspeed", "mpirun") and (spec.nnodes > 1 or spec.hosts):
        with open(spec.hostfile_path, "w") as fh:
            fh.write(hostfile_text(spec))
    cmd = commands[0]
    bindir = os.path.dirname(sys.executable)
    if not os.path.isabs(cmd[0]) and os.path.exists(os.path.join(bindir, cmd[0])):
        cmd = [os.path.join(bindir, cmd[0]), *cmd[1:]]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from parallel.launchenv import with_on_path

    env = with_on_path(root)
    if spec.device == "cpu":
        from parallel.devices import cuda_device_count

        if cuda_device_count():  # --device cpu on a GPU node: hide the GPUs, the workers train on the CPU (gloo)
            env["CUDA_VISIBLE_DEVICES"] = ""
    if spec.launcher == "accelerate":
        env["ACCELERATE_CONFIG_FILE"] = os.path.join(root, ACCELERATE_CONFIG)
        cmd = [c if c != ACCELERATE_CONFIG else os.path.join(root, ACCELERATE_CONFIG) for c in cmd]
    print("+ " + shlex.join(cmd), flush=True)
    return subprocess.call(cmd, env=env)

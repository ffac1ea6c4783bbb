"""msmoe launch's command lines and checks (launcher/launch.py), without starting anything."""

import pytest

from launcher.launch import LaunchError, LaunchSpec, build_commands, check_devices, check_environment, \
    check_hosts_reachable
from parallel.devices import DeviceCountError


def test_torchrun_lines_per_node_and_errors():
    spec = LaunchSpec("torchrun", nnodes=2, nproc_per_node=4, master_addr="10.0.0.1", master_port=1234)
    cmds = build_commands(spec, ["--config", "x.yaml"])
    assert len(cmds) == 2 and "--node_rank=1" in cmds[1] and "--rdzv_endpoint=10.0.0.1:1234" in cmds[1]
    with pytest.raises(LaunchError, match="give --master-addr"):
        build_commands(LaunchSpec("torchrun", nnodes=2), [])
    with pytest.raises(LaunchError, match="--nnodes 3 but the hostfile names only 2"):
        build_commands(LaunchSpec("deepspeed", nnodes=3, hosts=("a", "b")), [])


def test_clear_errors():
    with pytest.raises(LaunchError, match="do not resolve: no-such-host.invalid"):
        check_hosts_reachable(["localhost", "no-such-host.invalid"])
    with pytest.raises(DeviceCountError, match=r"--nproc-per-node 4 asks for 4 processes .* but 2 CUDA device\(s\) "
                                               r"are present: use --nproc-per-node 2, or --device cpu"):
        check_devices(LaunchSpec("torchrun", nproc_per_node=4, device="cuda"), cuda_count=2)
    check_devices(LaunchSpec("torchrun", nproc_per_node=4, device="cpu"), cuda_count=0)
    with pytest.raises(LaunchError, match="inside another launcher .*RANK=3"):
        check_environment({"RANK": "3", "PATH": "/bin"})

"""One process per GPU: the check shared by `msmoe launch`, `msmoe train --nproc` and worker start-up
(parallel/devices.py), with the GPU count given at the function boundary (this machine has none).
The real command refusing: tests/integration/test_devices.py."""


import pytest

from launcher.train import check_nproc_gpus
from parallel.devices import DeviceCountError, check_gpu_count


def test_more_processes_than_gpus_names_both_counts_and_the_fix():
    with pytest.raises(DeviceCountError) as info:
        check_nproc_gpus(2, count=1)
    assert str(info.value) == ('--nproc 2 asks for 2 processes on this node, one per GPU, but 1 CUDA device(s) are '
                               'present: use --nproc 1, or CUDA_VISIBLE_DEVICES="" to train on the CPU')
    with pytest.raises(DeviceCountError, match=r"--nproc 8 .* but 4 CUDA device\(s\) are present: use --nproc 4"):
        check_nproc_gpus(8, count=lambda: 4)


def test_enough_gpus_or_none_at_all_passes():
    check_nproc_gpus(2, count=2)
    check_nproc_gpus(1, count=1)
    check_nproc_gpus(4, count=0)  # no CUDA: the processes train on the CPU
    assert check_gpu_count(3, "--x", "y", count=lambda: 3) == 3


def test_count_is_asked_only_through_the_given_function():
    calls = []
    check_gpu_count(1, "--nproc", "cpu", count=lambda: calls.append(1) or 1)
    assert calls == [1]

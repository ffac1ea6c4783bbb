import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

from moe import compat  # noqa: E402

# torch._grouped_mm on CPU exists in the pinned torch 2.13, not in every torch msmoe supports
# (the GPU image's 2.11): tests that force impl="grouped_mm" on CPU skip where it is missing.
needs_cpu_grouped_mm = pytest.mark.skipif(
    not compat.grouped_mm_available(torch.device("cpu"), torch.float32),
    reason="torch._grouped_mm does not run on CPU in this torch " + torch.__version__)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield

"""The GPU node's image list that make gpu-bundle leaves out (gpucheck/gpu_node_packages.txt); the
bundle itself and its installation: tests/integration/test_gpu_bundle.py."""

import os

from gpucheck.bundle import image_has
from tests.helpers import ROOT


def test_the_image_list_is_the_nodes_with_its_date():
    image = image_has()
    assert len(image) > 150 and {"torch", "numpy", "packaging", "huggingface-hub", "typing-extensions"} <= image
    assert not {"deepspeed", "datasets", "fairscale", "pydantic"} & image  # what the bundle exists for
    with open(os.path.join(ROOT, "gpucheck", "gpu_node_packages.txt")) as fh:
        assert "as read on the node, 2026-11-17" in fh.readline()

"""make gpu-bundle: the wheels for the GPU node (needs the package registry, which CI reaches), and
installing them as the node does (pip or unzip, in a process of its own). The image list: tests/unit/gpucheck/test_bundle.py."""

import os
import subprocess
import sys
import zipfile
from collections import Counter

import pytest
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from gpucheck.bundle import PROVIDED, image_has, install_into, unpack_into
from tests.helpers import ROOT

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_12_x86_64",
             "manylinux2010_x86_64", "linux_x86_64"]
# what CPython 3.12 on manylinux x86-64 installs (cp312, abi3, py3x-none, any)
TARGET = set(cpython_tags((3, 12), platforms=PLATFORMS)) | set(compatible_tags((3, 12), "cp312", PLATFORMS))


def check_bundle(folder: str) -> list[str]:
    wheels = sorted(f for f in os.listdir(folder) if f.endswith(".whl"))
    names = [canonicalize_name(parse_wheel_filename(f)[0]) for f in wheels]
    assert "torch" not in names and not any(n.startswith("nvidia-") for n in names)
    assert {"deepspeed", "datasets", "fairscale", "pydantic-core"} <= set(names)
    image = image_has()
    assert sorted(set(names) & image) == []  # nothing the node's image already has (gpucheck/gpu_node_packages.txt)
    provided = open(os.path.join(folder, PROVIDED)).read()
    assert "packaging==" in provided and "numpy==" in provided  # what deepspeed needs from the image, named
    assert [n for n, c in Counter(names).items() if c > 1] == []  # one version per project
    for f in wheels:
        assert parse_wheel_filename(f)[3] & TARGET, f"{f} does not install on CPython 3.12 manylinux x86-64"
    assert sum(os.path.getsize(os.path.join(folder, f)) for f in wheels) < 40 * 2**20
    ours = {"common", "moe", "parallel", "reid", "training", "launcher", "bench", "scaling", "gpucheck", "tests",
            "configs"}
    for f in wheels:  # the bundle comes first on PYTHONPATH: it must not shadow a package of ours
        with zipfile.ZipFile(os.path.join(folder, f)) as zf:
            assert not {n.split("/")[0] for n in zf.namelist()} & ours, f
    return wheels


@pytest.mark.slow
def test_make_gpu_bundle():
    for _ in range(2):  # the second run finds everything in place
        proc = subprocess.run(["make", "gpu-bundle"], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "MiB in" in proc.stdout and "limit 40 MiB" in proc.stdout
    check_bundle(os.path.join(ROOT, ".whl"))


def test_unpack_without_pip(tmp_path):
    """Where the node's python3 has no pip, make gpu-check unzips the wheels as pip would."""

    wheels = tmp_path / "whl"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "toy-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("toy/__init__.py", "VALUE = 1\n")
        zf.writestr("toy-1.0.dist-info/METADATA", "Name: toy\nVersion: 1.0\n")
        zf.writestr("toy-1.0.data/purelib/toy_extra.py", "EXTRA = 2\n")
        zf.writestr("toy-1.0.data/scripts/toy", "#!/bin/sh\n")
    site = tmp_path / "site"
    assert unpack_into(str(wheels), str(site)) == ["toy-1.0-py3-none-any.whl"]
    out = subprocess.run([sys.executable, "-c", "import toy, toy_extra; print(toy.VALUE + toy_extra.EXTRA)"],
                         env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert out.stdout.strip() == "3", out.stderr
    assert not any(p.name.endswith(".data") for p in site.iterdir())


def _toy_wheel(folder, name, version):
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}_toy/__init__.py", f"NAME = {name!r}\n")
        zf.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{name}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{name}-{version}.dist-info/RECORD", "")
    return path.name


def test_install_skips_what_this_python_already_has_and_says_which(tmp_path):
    """On the node: a wheel of a distribution the image has (here: packaging, which this venv has)
    is not installed in front of it; a missing one is."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    have = _toy_wheel(wheels, "packaging", "0.0.1")
    new = _toy_wheel(wheels, "msmoe_probe_dist", "1.0")
    said = []
    site = tmp_path / "site"
    assert install_into(str(wheels), str(site), said.append) == [new]
    assert any(f"skipping {have}: this python already has packaging " in s for s in said), said
    assert (site / "msmoe_probe_dist_toy" / "__init__.py").exists() and not (site / "packaging_toy").exists()

"""``make gpu-bundle``: the wheels a GPU node without network needs beside its own torch.

The target image (see README, "First run on a GPU") has Python 3.12, torch 2.11 (CUDA 13) and the
distributions listed in ``gpucheck/gpu_node_packages.txt`` (read on the node, dated in its header); it
lacks deepspeed, datasets, fairscale and some of their requirements. This writes exactly those, for
CPython 3.12 manylinux x86-64, into ``.whl/`` (git-ignored):

  1. deepspeed and fairscale (pins from requirements.txt) built here: ``pip wheel --no-deps``
  2. their requirements (torch left out) and datasets (pinned) resolved together for the target
     (``pip install --dry-run --report``; pydantic-core comes out as the cp312 build pydantic pins)
  3. every resolved project except the image's distributions and what they pull in, downloaded
     ``--no-deps``; wheels of other versions left in ``.whl/`` are removed (one version each);
     ``.whl/image-provided.txt`` lists the image's distributions the bundle relies on (name==version
     as resolved here: what a stand-in of the image must hold)

  .venv/bin/python -m gpucheck.bundle                 # what make gpu-bundle runs
  .venv/bin/python -m gpucheck.bundle --out /tmp/whl  # elsewhere
Idempotent: wheels already present are kept. Fails above ``--max-mib`` (40).
On the node (what make gpu-check runs): each wheel whose distribution the node's python3 already
imports is skipped, by name, and the rest installed with pip --no-index --no-deps --target, or unzipped
as pip would where that interpreter has no pip:
  python3 -m gpucheck.bundle --install-into /tmp/msmoe-site
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILT = ("deepspeed", "fairscale")  # sdists (or wheels) built to wheels here
RESOLVED = ("datasets",)  # downloaded as wheels, with their requirements
IMAGE_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_node_packages.txt")
PROVIDED = "image-provided.txt"  # in the bundle folder: the image's distributions the bundle needs
TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
          "--abi", "cp312", "--abi", "abi3", "--abi", "none",
          "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
          "--platform", "manylinux2014_x86_64"]


def canonical(name: str) -> str:
    """PEP 503 project name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_project(filename: str) -> tuple[str, str]:
    """(canonical name, version) of a wheel file name."""
    name, version = os.path.basename(filename).split("-")[:2]
    return canonical(name), version


def pins(requirements: str) -> dict[str, str]:
    """``name==version`` lines of requirements.txt, by canonical name."""
    out = {}
    with open(requirements) as fh:
        for line in fh:
            m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#;]+)", line)
            if m:
                out[canonical(m.group(1))] = m.group(2)
    return out


def wheel_requirements(path: str) -> list[str]:
    """Requires-Dist of a wheel without extras (markers other than extras are kept)."""
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(zf.read(meta).decode())
    return [r for r in msg.get_all("Requires-Dist") or [] if "extra" not in r]


def requirement_name(req: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9_.-]+)", req).group(1))


def image_has(path: str = IMAGE_LIST) -> frozenset[str]:
    """The node image's distributions (canonical names; # comments and blank lines skipped)."""
    with open(path) as fh:
        return frozenset(canonical(ln.split("#")[0].strip()) for ln in fh if ln.split("#")[0].strip())


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        noise = "is ignored: it is neither a file nor a directory"
        err = "\n".join(line for line in proc.stderr.splitlines() if noise not in line)
        raise SystemExit(f"gpu-bundle: `{' '.join(cmd)}` failed:\n{err[-3000:]}")


def closure(roots: set[str], graph: dict[str, list[str]]) -> set[str]:
    """Every project reachable from ``roots`` in ``graph`` (roots included, where present)."""
    seen, todo = set(), [r for r in roots if r in graph]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(d for d in graph.get(n, []) if d in graph)
    return seen


def resolve(requirements: list[str]) -> dict[str, tuple[str, list[str]]]:
    """What pip installs for ``requirements`` on the target: name -> (version, requirement names)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        pip("install", "-q", "--dry-run", "--ignore-installed", "--target", os.path.join(tmp, "t"), *TARGET,
            "--report", report, *requirements)
        with open(report) as fh:
            items = json.load(fh)["install"]
    out = {}
    for item in items:
        meta = item["metadata"]
        deps = [requirement_name(r) for r in meta.get("requires_dist") or [] if "extra" not in r]
        out[canonical(meta["name"])] = (meta["version"], deps)
    return out


def build(out: str, requirements_txt: str) -> list[str]:
    """Fill ``out`` with the bundle; returns its wheel file names."""
    os.makedirs(out, exist_ok=True)
    pinned = pins(requirements_txt)
    missing = [n for n in BUILT + RESOLVED if n not in pinned]
    if missing:
        raise SystemExit(f"gpu-bundle: {missing} have no name==version pin in {requirements_txt}")
    present = {wheel_project(f): f for f in os.listdir(out) if f.endswith(".whl")}

    built = {}
    for name in BUILT:
        have = present.get((name, pinned[name]))
        if have is None:
            pip("wheel", "-q", "--no-deps", "-w", out, f"{name}=={pinned[name]}")
            have = next(f for f in os.listdir(out) if wheel_project(f) == (name, pinned[name]))
        built[name] = have

    image = image_has()
    reqs = [f"{n}=={pinned[n]}" for n in RESOLVED]
    for f in built.values():
        reqs += [r for r in wheel_requirements(os.path.join(out, f)) if requirement_name(r) != "torch"]
    graph = resolve(reqs)
    excluded = closure(set(image), {n: deps for n, (_, deps) in graph.items()})
    want = {n: v for n, (v, _) in graph.items() if n not in excluded}
    want.update({n: pinned[n] for n in BUILT})
    with open(os.path.join(out, PROVIDED), "w") as fh:
        fh.write(f"# distributions of {os.path.basename(IMAGE_LIST)} (the node's image) that the bundle needs "
                 "and leaves out; versions as resolved for the bundle\n")
        fh.writelines(f"{n}=={graph[n][0]}\n" for n in sorted(excluded & image) if n in graph)

    for (name, version), f in present.items():  # one version per project, nothing stale
        if want.get(name) != version:
            os.remove(os.path.join(out, f))
    have = {wheel_project(f) for f in os.listdir(out) if f.endswith(".whl")}
    fetch = [f"{n}=={v}" for n, v in sorted(want.items()) if (n, v) not in have]
    if fetch:
        pip("download", "-q", "--no-deps", *TARGET, "-d", out, *fetch)
    return sorted(f for f in os.listdir(out) if f.endswith(".whl"))


def unpack_into(folder: str, target: str) -> list[str]:
    """Install the wheels of ``folder`` into ``target`` without pip: unzip each, then lift its
    ``<name>.data/purelib`` and ``platlib`` into ``target`` (scripts and headers are not needed)."""
    os.makedirs(target, exist_ok=True)
    wheels = sorted(f for f in os.listdir(folder) if f.endswith(".whl"))
    for f in wheels:
        with zipfile.ZipFile(os.path.join(folder, f)) as zf:
            zf.extractall(target)
    for data in [d for d in os.listdir(target) if d.endswith(".data")]:
        for lib in ("purelib", "platlib"):
            src = os.path.join(target, data, lib)
            if os.path.isdir(src):
                shutil.copytree(src, target, dirs_exist_ok=True)
        shutil.rmtree(os.path.join(target, data))
    return wheels


def wheel_distribution(path: str) -> str:
    """The distribution a wheel installs (its dist-info Name, canonical)."""
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return canonical(Parser().parsestr(zf.read(meta).decode())["Name"])


def install_into(folder: str, target: str, log=print) -> list[str]:
    """What make gpu-check runs on the node: skip, by name, every wheel whose distribution this
    interpreter already imports (the image's copy wins, never shadowed from PYTHONPATH), install
    the rest into ``target`` (pip --no-index --no-deps, or unpack_into without pip). The wheels
    installed."""
    from importlib import metadata

    wheels = sorted(f for f in os.listdir(folder) if f.endswith(".whl"))
    keep = []
    for f in wheels:
        try:
            have = metadata.version(wheel_distribution(os.path.join(folder, f)))
        except metadata.PackageNotFoundError:
            keep.append(f)
            continue
        log(f"gpu-bundle: skipping {f}: this python already has {wheel_distribution(os.path.join(folder, f))} "
            f"{have}")
    if not keep:
        return []
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        pip("install", "-q", "--no-index", "--no-deps", "--target", target, *(os.path.join(folder, f) for f in keep))
    else:
        log(f"gpu-bundle: {sys.executable} has no pip: unpacking the wheels into {target}")
        staging = tempfile.mkdtemp(prefix="msmoe-wheels-")
        try:
            for f in keep:
                shutil.copy(os.path.join(folder, f), staging)
            unpack_into(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"gpu-bundle: {len(keep)} wheels installed into {target}, {len(wheels) - len(keep)} skipped")
    return keep


def image_missing(provided: str) -> list[str]:
    """The name==version lines of ``provided`` whose distribution this interpreter lacks."""
    from importlib import metadata

    out = []
    with open(provided) as fh:
        for line in (ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")):
            try:
                metadata.version(line.split("==")[0])
            except metadata.PackageNotFoundError:
                out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, ".whl"))
    p.add_argument("--requirements", default=os.path.join(ROOT, "requirements.txt"))
    p.add_argument("--max-mib", type=float, default=40.0)
    p.add_argument("--unpack-into", default=None, help="install --out's wheels into this folder without pip")
    p.add_argument("--install-into", default=None, help="on the node: install --out's wheels into this folder, "
                   "skipping those whose distribution this python already has")
    p.add_argument("--image-missing", action="store_true", help="print the entries of --out's image-provided.txt "
                   "this python lacks (what a stand-in of the node's image must add)")
    args = p.parse_args(argv)
    if args.image_missing:
        print("\n".join(image_missing(os.path.join(args.out, PROVIDED))))
        return 0
    if args.install_into:
        install_into(args.out, args.install_into)
        return 0
    if args.unpack_into:
        wheels = unpack_into(args.out, args.unpack_into)
        print(f"gpu-bundle: {len(wheels)} wheels unpacked into {args.unpack_into}")
        return 0 if wheels else 1
    wheels = build(args.out, args.requirements)
    total = 0
    for f in wheels:
        size = os.path.getsize(os.path.join(args.out, f))
        total += size
        print(f"  {size / 2**20:7.2f} MiB  {f}")
    print(f"gpu-bundle: {len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.out} (limit {args.max_mib:g} MiB)")
    if total > args.max_mib * 2**20:
        print(f"gpu-bundle: {total / 2**20:.1f} MiB is over {args.max_mib:g} MiB: the node takes at most that "
              "much beside the checkout", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Imports run one way: gpucheck -> launcher -> scaling -> bench -> training -> reid / parallel -> moe
-> common (docs/ARCHITECTURE.md).

Every import statement of every module (top level or inside a function) is read with ``ast``; an
import of a package at the same level (reid <-> parallel) or above fails, naming file and line.
common/, the leaf, imports none of the project's other packages (only the standard library, torch,
yaml, numpy, matplotlib). No module outside launcher/ names ``launcher.cli`` either (a subprocess
string would be an upward reach the imports do not show): msmoe command lines come from
launcher/command.py."""

import ast
import os

from tests.helpers import ROOT

LEVEL = {"common": -1, "moe": 0, "parallel": 1, "reid": 1, "training": 2, "cluster": 2, "bench": 3, "scaling": 4, "launcher": 5,
         "gpucheck": 6}
CLI = "launcher" + ".cli"  # spelt in two so that this file does not name it either


def imports(path: str) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def python_files(root: str, pkg: str) -> list[str]:
    """Every .py file of package ``pkg`` under ``root``."""
    out = []
    for folder, _, files in os.walk(os.path.join(root, pkg)):
        out += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return out


def package_imports(root: str, pkg: str) -> list[tuple[str, int, str]]:
    """(file relative to root, line, imported module) for every import in package ``pkg``."""
    return [(os.path.relpath(path, root), line, module)
            for path in python_files(root, pkg) for line, module in imports(path)]


def upward_imports(root: str) -> list[str]:
    bad = []
    for pkg, level in LEVEL.items():
        for path, line, module in package_imports(root, pkg):
            top = module.split(".")[0]
            if top in LEVEL and top != pkg and LEVEL[top] >= level:
                bad.append(f"{path}:{line} imports {module}")
    return bad


def cli_strings(root: str) -> list[str]:
    """Lines outside launcher/ that name the CLI module (file:line)."""
    bad = []
    for pkg in LEVEL:
        if pkg == "launcher":
            continue
        for path in python_files(root, pkg):
            bad += [f"{os.path.relpath(path, root)}:{i} names {CLI}" for i, line in enumerate(open(path), 1)
                    if CLI in line]
    return bad


# Inside training/: the components know nothing of the trainer and the job that wire them, nor of
# each other except as listed (the report reads the metrics' records).
WIRING = {"training.trainer", "training.job"}
COMPONENT_MAY_NOT = {
    "training/checkpoint": WIRING | {"training.metrics", "training.report"},
    "training/metrics": WIRING | {"training.checkpoint", "training.report"},
    "training/report": WIRING | {"training.checkpoint"},
}


def component_imports(root: str) -> list[str]:
    bad = []
    for component, banned in COMPONENT_MAY_NOT.items():
        for folder, _, files in os.walk(os.path.join(root, component)):
            for f in sorted(n for n in files if n.endswith(".py")):
                path = os.path.join(folder, f)
                for line, module in imports(path):
                    if any(module == b or module.startswith(b + ".") for b in banned):
                        bad.append(f"{os.path.relpath(path, root)}:{line} imports {module}")
    return bad


def test_no_import_runs_up_the_stack():
    assert upward_imports(ROOT) == []


def test_the_check_sees_an_upward_import(tmp_path):
    for pkg in LEVEL:
        (tmp_path / pkg).mkdir()
    (tmp_path / "moe" / "bad.py").write_text("def f():\n    from training.trainer import Trainer\n")
    (tmp_path / "reid" / "worse.py").write_text("import parallel.groups\n")
    (tmp_path / "launcher" / "fine.py").write_text("from moe import PatchMoE\n")
    (tmp_path / "scaling" / "up.py").write_text("import gpucheck.check\nfrom bench.layer import run_layer_bench\n")
    (tmp_path / "common" / "leaf.py").write_text("import torch\nfrom common import files\nfrom moe.config import X\n")
    assert upward_imports(str(tmp_path)) == ["common/leaf.py:3 imports moe.config",
                                             "moe/bad.py:2 imports training.trainer",
                                             "reid/worse.py:1 imports parallel.groups",
                                             "scaling/up.py:1 imports gpucheck.check"]


def test_common_imports_no_other_package_of_the_project():
    ours = {d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))} - {"common"}
    assert "moe" in ours and "tests" in ours
    assert [f"{path}:{line} imports {m}" for path, line, m in package_imports(ROOT, "common")
            if m.split(".")[0] in ours] == []


def test_only_launcher_names_the_cli_module():
    assert cli_strings(ROOT) == []


def test_the_check_sees_a_cli_string(tmp_path):
    for pkg in LEVEL:
        (tmp_path / pkg).mkdir()
    (tmp_path / "scaling" / "sweep.py").write_text(f"import sys\ncmd = [sys.executable, '-m', '{CLI}', 'train']\n")
    (tmp_path / "gpucheck" / "check.py").write_text(f"# runs {CLI} data synth\n")
    (tmp_path / "launcher" / "command.py").write_text(f"CLI_MODULE = '{CLI}'\n")
    assert cli_strings(str(tmp_path)) == [f"scaling/sweep.py:2 names {CLI}", f"gpucheck/check.py:1 names {CLI}"]


def test_training_components_do_not_import_their_wiring(tmp_path):
    assert component_imports(ROOT) == []
    (tmp_path / "training" / "metrics").mkdir(parents=True)
    (tmp_path / "training" / "metrics" / "bad.py").write_text("from training.checkpoint import store\n")
    assert component_imports(str(tmp_path)) == ["training/metrics/bad.py:1 imports training.checkpoint"]

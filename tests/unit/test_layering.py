"""Imports run one way: gpucheck -> launcher -> scaling -> bench -> training -> reid / parallel -> moe
(docs/ARCHITECTURE.md).

Every import statement of every module (top level or inside a function) is read with ``ast``; an
import of a package at the same level (reid <-> parallel) or above fails, naming file and line.
No module outside launcher/ names ``launcher.cli`` either (a subprocess string would be an upward
reach the imports do not show): msmoe command lines come from launcher/command.py."""

import ast
import os

from tests.helpers import ROOT

LEVEL = {"moe": 0, "parallel": 1, "reid": 1, "training": 2, "bench": 3, "scaling": 4, "launcher": 5, "gpucheck": 6}
CLI = "launcher" + ".cli"  # spelt in two so that this file does not name it either


def imports(path: str) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def upward_imports(root: str) -> list[str]:
    bad = []
    for pkg, level in LEVEL.items():
        for folder, _, files in os.walk(os.path.join(root, pkg)):
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                path = os.path.join(folder, f)
                for line, module in imports(path):
                    top = module.split(".")[0]
                    if top in LEVEL and top != pkg and LEVEL[top] >= level:
                        bad.append(f"{os.path.relpath(path, root)}:{line} imports {module}")
    return bad


def cli_strings(root: str) -> list[str]:
    """Lines outside launcher/ that name the CLI module (file:line)."""
    bad = []
    for pkg in LEVEL:
        if pkg == "launcher":
            continue
        for folder, _, files in os.walk(os.path.join(root, pkg)):
            for f in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, f)
                bad += [f"{os.path.relpath(path, root)}:{i} names {CLI}" for i, line in enumerate(open(path), 1)
                        if CLI in line]
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
    assert upward_imports(str(tmp_path)) == ["moe/bad.py:2 imports training.trainer",
                                             "reid/worse.py:1 imports parallel.groups",
                                             "scaling/up.py:1 imports gpucheck.check"]


def test_only_launcher_names_the_cli_module():
    assert cli_strings(ROOT) == []


def test_the_check_sees_a_cli_string(tmp_path):
    for pkg in LEVEL:
        (tmp_path / pkg).mkdir()
    (tmp_path / "scaling" / "sweep.py").write_text(f"import sys\ncmd = [sys.executable, '-m', '{CLI}', 'train']\n")
    (tmp_path / "gpucheck" / "check.py").write_text(f"# runs {CLI} data synth\n")
    (tmp_path / "launcher" / "command.py").write_text(f"CLI_MODULE = '{CLI}'\n")
    assert cli_strings(str(tmp_path)) == [f"scaling/sweep.py:2 names {CLI}", f"gpucheck/check.py:1 names {CLI}"]

"""tests/unit/ holds unit tests only: no file there starts another process (the project's rule,
tests/conftest.py: whole commands, launchers and multi-process jobs go to tests/integration/).

Every file is read with ``ast``: a call or an import of ``subprocess`` / ``multiprocessing``
(``Popen``, ``run``, ``spawn`` ...), ``os.system`` / ``os.fork`` / ``os.exec*`` / ``os.spawn*``,
or a call of the test helpers that start processes (``run_cli``, ``run_torchrun``,
``run_parallel``, ``run_command``, ``cli_env``) fails, naming the file and line."""

import ast
import os

from tests.helpers import ROOT

PROCESS_MODULES = {"subprocess", "multiprocessing", "torch.multiprocessing"}
OS_PROCESS_CALLS = {"system", "fork", "forkpty", "popen", "posix_spawn", "posix_spawnp"}
HELPERS = {"run_cli", "run_torchrun", "run_parallel", "run_command", "cli_env"}
# The bench commands' own tests (left in tests/unit/bench by the bench/ split): they leave this list
# as they move to tests/integration/. Nothing may be added to it.
def _called_name(node: ast.Call) -> tuple[str | None, str]:
    """(module or object name, attribute) of ``mod.fn(...)``; (None, name) of ``fn(...)``."""
    f = node.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f.value.id, f.attr
    if isinstance(f, ast.Name):
        return None, f.id
    return None, ""


def process_starts(source: str, path: str = "<test>") -> list[str]:
    """``line: what`` for every way ``source`` could start a process."""
    found = []
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name in PROCESS_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module in PROCESS_MODULES:
            found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom):
            found += [f"{node.lineno}: imports {a.name}" for a in node.names if a.name in HELPERS]
        elif isinstance(node, ast.Call):
            owner, name = _called_name(node)
            if owner == "os" and (name in OS_PROCESS_CALLS or name.startswith(("exec", "spawn"))):
                found.append(f"{node.lineno}: os.{name}()")
            elif name in HELPERS:
                found.append(f"{node.lineno}: {name}()")
    return sorted(found, key=lambda hit: int(hit.split(":")[0]))


def unit_files_starting_processes(unit_root: str) -> list[str]:
    bad = []
    for folder, _, files in os.walk(unit_root):
        for f in sorted(files):
            path = os.path.join(folder, f)
            rel = os.path.relpath(path, unit_root)
            if f.endswith(".py"):
                bad += [f"tests/unit/{rel}:{hit}" for hit in process_starts(open(path).read(), path)]
    return bad


def test_no_unit_test_starts_a_process():
    assert unit_files_starting_processes(os.path.join(ROOT, "tests", "unit")) == []


def test_the_scan_sees_each_way_of_starting_a_process():
    source = ("import subprocess\nfrom multiprocessing import Process\nimport os\nfrom tests.helpers import run_cli\n"
              "def test_x():\n    os.system('true')\n    os.execv('/bin/true', [])\n    run_torchrun('w.py', 2, [], '.')\n"
              "    os.path.join('a', 'b')\n")
    assert process_starts(source) == ["1: import subprocess", "2: from multiprocessing import ...",
                                      "4: imports run_cli", "6: os.system()", "7: os.execv()", "8: run_torchrun()"]
    assert process_starts("import os\nimport torch\nos.makedirs('x')\n") == []

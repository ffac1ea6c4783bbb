"""Every error a user can fix derives from common.errors.UserError, the one class the CLI catches
(launcher/cli.py: one line, exit 2). The exception classes of every project package are found with
``ast`` (a class whose base is a builtin exception or another one found), then imported and checked;
the few that are not user errors are listed here with the reason."""

import ast
import builtins
import importlib
import os

from common.errors import UserError
from tests.helpers import ROOT

NOT_USER_ERRORS = {  # by class name, wherever the class lives
    "TrainingHalted": "the run stopped itself (bad steps): exit 3, after a checkpoint (training/guards.py)",
    "BenchError": "the EP benchmark's workers crashed: exits with their code and stderr (bench/ep.py)",
    "MarkerError": "an unreadable marker, caught where it is read: verify, checkpoint (training/checkpoint/manifest.py)",
    "ZeroStateError": "caught and said as a ReshardError / ElasticError by its callers (parallel/zero_state.py)",
    "AgentsFailed": "a run failed on an emulated node: msmoe cluster says so with the node's log (exit 1), "
                    "msmoe scale --cluster as a ScaleError (cluster/agents.py)",
}


def packages(root: str) -> list[str]:
    return sorted(d for d in os.listdir(root) if d != "tests" and os.path.isfile(os.path.join(root, d, "__init__.py")))


def _base_names(node: ast.ClassDef) -> list[str]:
    return [b.id if isinstance(b, ast.Name) else b.attr for b in node.bases if isinstance(b, (ast.Name, ast.Attribute))]


def _is_builtin_exception(name: str) -> bool:
    value = getattr(builtins, name, None)
    return isinstance(value, type) and issubclass(value, BaseException)


def exception_classes(root: str) -> list[str]:
    """``module.Class`` of every top-level class deriving (by name, within the project) from an exception."""
    found: dict[str, list[str]] = {}  # class name -> its base names
    where: dict[str, list[str]] = {}  # class name -> modules defining it
    for pkg in packages(root):
        for folder, _, files in os.walk(os.path.join(root, pkg)):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    for node in ast.parse(open(path).read(), path).body:
                        if isinstance(node, ast.ClassDef):
                            found[node.name] = _base_names(node)
                            where.setdefault(node.name, []).append(module)
    errors: set[str] = set()
    while True:
        more = {n for n, bases in found.items() if n not in errors
                and any(_is_builtin_exception(b) or b in errors for b in bases)}
        if not more:
            break
        errors |= more
    return sorted(f"{m}.{n}" for n in errors for m in where[n])


def _load(qualname: str) -> type:
    module, name = qualname.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_every_user_facing_error_is_a_user_error():
    classes = exception_classes(ROOT)
    names = {q.rsplit(".", 1)[1]: q for q in classes}
    assert len(classes) >= 20 and "AblationError" in names  # the walk sees them
    loaded = {q: _load(q) for q in classes}
    assert [q for q, c in loaded.items() if issubclass(c, BaseException) and not issubclass(c, UserError)
            and c.__name__ not in NOT_USER_ERRORS] == []
    for name in NOT_USER_ERRORS:  # each exemption still exists and is still no user error
        assert name in names and not issubclass(loaded[names[name]], UserError), name


def test_user_errors_keep_their_builtin_base():
    """``except ValueError`` / ``except OSError`` around them still holds."""
    from common.config import ConfigError
    from reid.data import DataError
    from training.checkpoint.store import CheckpointUnverified
    from training.checkpoint.save_guard import CheckpointWriteError

    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(CheckpointUnverified, FileNotFoundError) and issubclass(CheckpointWriteError, OSError)


def test_the_walk_sees_indirect_subclasses(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("class AError(ValueError):\n    pass\n\n\nclass Plain:\n    pass\n")
    (tmp_path / "pkg" / "b.py").write_text("from pkg.a import AError\n\n\nclass BError(AError):\n    pass\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "__init__.py").write_text("class Ignored(Exception):\n    pass\n")
    assert exception_classes(str(tmp_path)) == ["pkg.a.AError", "pkg.b.BError"]

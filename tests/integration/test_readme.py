"""README.md walked as a newcomer would: its commands, in order, in a fresh copy of the checkout.

The walk's convention, the one README.md and docs/*.md follow:
- A command is a line of a ```bash fenced block (lines ending in a backslash joined to the next).
  Lines that are only a comment are not commands. Other fences (```python, plain ```) are not run.
- A command whose line carries the comment ``# (not in the walk: REASON)`` is skipped: make targets
  that set up or take minutes, GPU-only, SLURM-only, several nodes, the network.
- ``<!-- not in the walk: REASON -->`` on the line before a fence skips that whole block.
Every other command must exit 0, run by bash in the order of the file, from the root of a temporary
copy of the checkout (``git ls-files``: the tracked files and untracked ones git does not ignore), with
``.venv`` and ``build/`` (DeepSpeed's CPU op) linked to this checkout's, so the real checkout's
``runs/`` and ``data_cache/`` are never touched. PYTHONPATH starts with the copy (the editable
install points at this checkout); report plots are off (MSMOE_REPORT_PLOTS=0, as in every test).

The cheap checks (not slow): every ``docs/*.md`` link in README.md and the guides exists, every
``msmoe <command>`` named in README.md is a real subcommand, every skip names its reason.
"""

import os
import re
import shutil
import subprocess
import time

import pytest

from parallel.launchenv import with_on_path
from tests.helpers import ROOT, VENV_BIN

README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
SKIP_LINE = re.compile(r"#\s*\(not in the walk:\s*([^)]+)\)")
SKIP_BLOCK = re.compile(r"<!--\s*not in the walk:\s*(.+?)\s*-->")
WALK_TIMEOUT_S = 300  # one command; the whole walk costs about a minute on 2 cores


def bash_commands(text: str) -> list[tuple[str, str | None]]:
    """(command, why it is skipped or None) for every command of ``text``'s ```bash blocks, in order."""
    out, block, skip_block, pending, previous = [], None, None, "", ""
    for line in text.splitlines():
        fence = line.strip()
        if block is None:
            if fence.startswith("```"):
                block = fence[3:].strip()
                match = SKIP_BLOCK.search(previous)
                skip_block = match.group(1) if match else None
            previous = line if line.strip() else previous
            continue
        if fence.startswith("```"):
            block, previous = None, ""
            continue
        if block != "bash":
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        command, pending = pending.strip(), ""
        if command and not command.startswith("#"):
            match = SKIP_LINE.search(command)
            out.append((command, skip_block or (match.group(1).strip() if match else None)))
    return out


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _guides() -> list[str]:
    return sorted(os.path.join(DOCS, name) for name in os.listdir(DOCS) if name.endswith(".md"))


def test_every_docs_link_exists():
    readme = _read(README)
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", readme))
    assert linked, "README.md links no guide in docs/"
    missing = [f"README.md -> {p}" for p in sorted(linked) if not os.path.isfile(os.path.join(ROOT, p))]
    for guide in _guides():
        for target in re.findall(r"\]\(([A-Z_]+\.md)", _read(guide)):
            if not os.path.isfile(os.path.join(DOCS, target)):
                missing.append(f"docs/{os.path.basename(guide)} -> {target}")
    assert not missing, f"links to files that do not exist: {missing}"


def _code_text(text: str) -> str:
    """The ```bash blocks and the inline `code` of ``text``: where a command is named."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return "\n".join(blocks + re.findall(r"`([^`\n]+)`", prose))


def test_every_msmoe_command_in_the_readme_exists():
    from launcher.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    named = set(re.findall(r"\bmsmoe\s+([a-z][a-z-]*)", _code_text(_read(README))))
    assert {"train", "eval", "launch"} <= named, named
    unknown = sorted(named - set(sub.choices))
    assert not unknown, f"README.md names msmoe subcommands that do not exist: {unknown}; known: {sorted(sub.choices)}"


def test_every_skip_says_why_and_the_walk_is_left_something():
    for path in [README, *_guides()]:
        for line in _read(path).splitlines():
            if "not in the walk" in line:
                assert SKIP_LINE.search(line) or SKIP_BLOCK.search(line), f"{path}: a skip without its reason: {line}"
    commands = bash_commands(_read(README))
    walked = [c for c, why in commands if why is None]
    assert len(walked) >= 10, walked
    assert all(why for c, why in commands if c.startswith("make ")), "make targets set up or take minutes"


def _fresh_copy(dest: str) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src) and not os.path.islink(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    os.symlink(os.path.dirname(VENV_BIN), os.path.join(dest, ".venv"))
    if os.path.isdir(os.path.join(ROOT, "build")):
        os.symlink(os.path.realpath(os.path.join(ROOT, "build")), os.path.join(dest, "build"))


@pytest.mark.slow
def test_the_readme_walks_top_to_bottom(tmp_path):
    checkout = str(tmp_path / "msmoe")
    _fresh_copy(checkout)
    env = {**with_on_path(checkout), "MSMOE_REPORT_PLOTS": "0"}
    log = []
    for command, why in bash_commands(_read(README)):
        if why is not None:
            log.append(f"skip  {command[:100]}  ({why})")
            print(log[-1], flush=True)
            continue
        start = time.monotonic()
        done = subprocess.run(["bash", "-c", command], cwd=checkout, env=env, capture_output=True, text=True,
                              timeout=WALK_TIMEOUT_S)
        log.append(f"rc {done.returncode}  {time.monotonic() - start:5.1f} s  {command[:100]}")
        print(log[-1], flush=True)
        assert done.returncode == 0, ("\n".join(log) + f"\n--- stdout\n{done.stdout[-3000:]}"
                                      f"\n--- stderr\n{done.stderr[-3000:]}")

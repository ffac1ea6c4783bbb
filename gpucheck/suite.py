"""gpu-check section "tests": the fast test suite (-m "not slow") in parallel shards.

Started by gpucheck/check.py beside the other correctness sections; the suite's files are split
into ``SHARDS`` pytest processes (largest files first, each to the least loaded shard), each with
``THREADS`` torch threads and its own JUnit report; ``result`` merges them into tests.json.

  python3 -m pytest -q -m "not slow" tests      # what the shards add up to
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

from gpucheck.process import wait_or_kill

SHARDS = 4
THREADS = "2"  # 4 shards x 2 threads: half the node's 16 cores, the rest for the sections beside them
NO_TESTS = 5  # pytest's exit code when a shard's files hold only slow tests


def shard_files(root: str, quick: bool) -> list[list[str]]:
    if quick:
        return [["tests/unit/common/test_compat.py"], ["tests/unit/moe/test_grouped.py"]]
    files = sorted(glob.glob(os.path.join(root, "tests", "**", "test_*.py"), recursive=True), key=os.path.getsize,
                   reverse=True)
    shards: list[list[str]] = [[] for _ in range(SHARDS)]
    load = [0] * SHARDS
    for f in files:
        i = load.index(min(load))
        shards[i].append(os.path.relpath(f, root))
        load[i] += os.path.getsize(f)
    return [s for s in shards if s]


class SuiteRun:
    """The shards as running processes; ``wait`` returns the section result."""

    def __init__(self, root: str, out: str, quick: bool, budget_s: float):
        self.out, self.budget_s, self.t0 = out, budget_s, time.perf_counter()
        self.procs = []
        for i, files in enumerate(shard_files(root, quick)):
            cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                   f"--junitxml={os.path.join(out, f'tests-{i}.xml')}", *files]
            log = open(os.path.join(out, f"tests-{i}.log"), "w")
            self.procs.append((cmd, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                                     env={**os.environ, "OMP_NUM_THREADS": THREADS},
                                                     start_new_session=True), log))

    def commands(self) -> list[str]:
        return [" ".join(cmd) for cmd, _, _ in self.procs]

    def wait(self) -> dict:
        codes = []
        for _, proc, log in self.procs:
            codes.append(wait_or_kill(proc, max(1.0, self.budget_s - (time.perf_counter() - self.t0))))
            log.close()
        with open(os.path.join(self.out, "tests.log"), "w") as fh:
            for i in range(len(self.procs)):
                with open(os.path.join(self.out, f"tests-{i}.log"), errors="replace") as src:
                    fh.write(f"--- shard {i}: {self.procs[i][0][-1]} ...\n{src.read()}\n")
        return self._result(codes)

    def _result(self, codes: list[int]) -> dict:
        figures = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "shards": len(codes), "suite_s": 0.0}
        failed = []
        for i, code in enumerate(codes):
            junit = os.path.join(self.out, f"tests-{i}.xml")
            if code == 124 or not os.path.isfile(junit):
                continue
            root = ET.parse(junit).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            for k in ("tests", "failures", "errors", "skipped"):
                figures[k] += int(suite.get(k, 0))
            figures["suite_s"] = max(figures["suite_s"], float(suite.get("time", 0)))
            failed += [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                       if c.find("failure") is not None or c.find("error") is not None]
        figures["passed"] = figures["tests"] - figures["failures"] - figures["errors"] - figures["skipped"]
        timed_out = sum(c == 124 for c in codes)
        passed = not timed_out and all(c in (0, NO_TESTS) for c in codes)
        summary = (f"{figures['passed']} passed, {figures['failures'] + figures['errors']} failed, "
                   f"{figures['skipped']} skipped (not slow; {len(codes)} shards, longest {figures['suite_s']:.0f} s)"
                   + (f"; {timed_out} shard(s) over the budget of {self.budget_s:.0f} s" if timed_out else "")
                   + "".join(f"; shard {i} exited {c} (tests-{i}.log)" for i, c in enumerate(codes)
                             if c not in (0, NO_TESTS, 124)))
        res = {"section": "tests", "passed": passed, "summary": summary, "figures": figures,
               "rows": [{"failed": f} for f in failed[:50]] + [{"shard": i, "exit": c} for i, c in enumerate(codes)]}
        with open(os.path.join(self.out, "tests.json"), "w") as fh:
            json.dump(res, fh, indent=2)
        return res

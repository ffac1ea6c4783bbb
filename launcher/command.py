"""The one place that writes an msmoe command line: ``python -m launcher.cli ARGS``, plain or
under torchrun.

  msmoe_command(["data", "synth", "--config", c])        # [python, -m, launcher.cli, data, synth, ...]
  msmoe_command(["train", ...], nproc=2)                 # python -m torch.distributed.run --standalone
                                                         #   --nproc_per_node=2 -m launcher.cli train ...

Packages below launcher/ never name ``launcher.cli``: the command of launcher/ that starts them
hands this function down (scaling/campaign.py ``Command``), and gpucheck/, which sits above
launcher/, imports it (tests/unit/test_layering.py checks both).
"""

from __future__ import annotations

import sys
from typing import Sequence

from parallel.launchenv import torchrun_command

CLI_MODULE = "launcher.cli"


def msmoe_target(args: Sequence[str]) -> list[str]:
    """``-m launcher.cli ARGS``: what a launcher started elsewhere runs (cluster/agents.py's agents)."""
    return ["-m", CLI_MODULE, *args]


def msmoe_command(args: Sequence[str], *, nproc: int | str | None = None, python: str | None = None,
                  **torchrun: object) -> list[str]:
    """``msmoe ARGS`` as a child process: with ``nproc``, under torchrun with that many processes per
    node (``torchrun``: the keyword options of parallel/launchenv.py ``torchrun_command``)."""
    target = msmoe_target(args)
    if nproc is None:
        return [python or sys.executable, *target]
    return torchrun_command(nproc, target, python=python, **torchrun)

"""Checkpoint markers as older msmoe versions wrote them, for the tests that read them."""

import os

from common.files import write_text_atomic
from training.checkpoint.manifest import MARKER


def write_legacy_marker(step_dir: str, step: int) -> None:
    """The old COMMITTED marker (a bare step number): complete, unverifiable."""
    write_text_atomic(os.path.join(step_dir, MARKER), f"{step}\n")

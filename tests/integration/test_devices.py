"""`msmoe train --nproc N` refuses on a machine with too few GPUs before it starts any worker (the real
command in a child process; the check itself: tests/unit/parallel/test_devices.py)."""

import subprocess
import sys

from parallel.launchenv import with_on_path
from tests.helpers import ROOT


def test_train_refuses_before_starting_workers_on_a_machine_without_enough_gpus():
    """The real command on this machine (no CUDA): --nproc 2 is fine for CPU training, so the check
    must not refuse it; with the check fed 1 GPU it refuses before torchrun is started."""
    code = ("import sys; from launcher import train; "
            "train.check_nproc_gpus = (lambda f: (lambda n, count=None: f(n, count=1)))(train.check_nproc_gpus); "
            "train.run_child = lambda *a, **k: sys.exit('torchrun was started'); "
            "from launcher.cli import main; sys.exit(main(['train', '--config', 'configs/tiny.yaml', '--nproc', '2']))")
    env = with_on_path(ROOT)
    env.pop("RANK", None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "msmoe: error: --nproc 2 asks for 2 processes on this node, one per GPU, but 1 CUDA device(s)" in p.stderr
    assert "torchrun was started" not in p.stderr and "Traceback" not in p.stderr

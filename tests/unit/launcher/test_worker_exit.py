"""How the workers of `msmoe train --nproc N` tell it how they ended (launcher/worker_exit.py)."""

import os
import signal

from launcher.worker_exit import ENV, outcome, read, report


def test_a_worker_notes_its_code_and_hides_only_agreed_ones_from_torchrun(tmp_path):
    env = {ENV: str(tmp_path), "RANK": "1"}
    assert report(143, env) == 0 and read(str(tmp_path)) == {1: 143}  # interrupted: every rank stopped alike
    assert report(0, env) == 0 and read(str(tmp_path)) == {1: 0}
    assert report(2, env) == 2 and read(str(tmp_path)) == {1: 2}  # an error: torchrun stops the others at once
    assert report(143, {"RANK": "1"}) == 143  # plain torchrun: nothing to note, the code as it is
    assert report(143, {ENV: str(tmp_path / "gone"), "RANK": "0"}) == 143 and os.listdir(tmp_path) == ["rank1"]


def test_the_command_exits_with_the_code_its_workers_agreed_on():
    # SIGTERM to one worker: both stopped after the same step, torchrun saw two exits 0
    assert outcome({0: 143, 1: 143}, 2, None, 0) == (143, None)
    # Ctrl-C during the final evaluation: the run completed
    code, note = outcome({0: 0, 1: 0}, 2, signal.SIGINT, 1)
    assert code == 0 and "SIGINT came as the run was finishing: the workers completed it" in note
    code, note = outcome({0: 130, 1: 130}, 2, signal.SIGINT, 1)
    assert code == 130 and "the workers stopped" in note
    assert outcome({1: 130}, 2, signal.SIGINT, 1)[0] == 130  # a worker without a note: the signal's code
    assert outcome({0: 2, 1: 143}, 2, None, 1) == (1, None)  # no agreement: torchrun's code
    assert outcome({}, 2, None, 0) == (0, None)

"""Stop signals (training/preemption.py): a real signal to this process, and the agreement over ranks
that makes a signal to one rank act like a signal to all of them."""

import os
import signal

import pytest

from training.preemption import (
    STOP_SIGNALS, Preemption, agreed_signal, interrupted_exit_code, signal_flags, signal_name,
)


@pytest.fixture
def handlers():
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_signal_to_one_rank_is_the_signal_of_every_rank(handlers):
    signalled = Preemption().install()
    os.kill(os.getpid(), signal.SIGTERM)  # a real SIGTERM to this "rank"; the other rank got none
    assert signalled.signal == signal.SIGTERM
    summed = [a + b for a, b in zip(signal_flags(signalled.signal), signal_flags(None))]  # the all-reduce
    agreed = agreed_signal(summed)
    assert agreed == signal.SIGTERM and signal_name(agreed) == "SIGTERM" and interrupted_exit_code(agreed) == 143
    assert agreed_signal(signal_flags(None)) is None and signal_name(None) == ""


def test_different_signals_on_different_ranks_agree_on_one():
    summed = [sum(f) for f in zip(signal_flags(signal.SIGUSR1), signal_flags(signal.SIGINT), signal_flags(None))]
    assert agreed_signal(summed) == signal.SIGINT  # Ctrl-C first, then a kill, then SLURM's warning
    summed = [sum(f) for f in zip(signal_flags(signal.SIGUSR1), signal_flags(signal.SIGTERM))]
    assert agreed_signal(summed) == signal.SIGTERM

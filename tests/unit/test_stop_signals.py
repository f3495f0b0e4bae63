"""Every stop signal a cluster or terminal sends sets the preemption flag in the loop, and raises during setup."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from linnaeus.engine import preemption
from linnaeus.engine.preemption import Preemption, StoppedDuringSetup, install_stop_handlers
from linnaeus.utils.signals import STOP_SIGNALS


@pytest.fixture(autouse=True)
def _restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    preemption._state.received = ""
    preemption._state.raise_on_signal = False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2])
def test_each_stop_signal_sets_the_flag_in_the_loop(sig) -> None:
    stop = Preemption(torch.device("cpu"))
    assert not stop.agreed(1)
    os.kill(os.getpid(), sig)
    assert stop.agreed(2) and stop.signal_name == sig.name


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1])
def test_a_stop_signal_during_setup_raises_once(sig) -> None:
    install_stop_handlers()
    with pytest.raises(StoppedDuringSetup) as err:
        os.kill(os.getpid(), sig)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert err.value.signal_name == sig.name
    os.kill(os.getpid(), sig)  # a second one while unwinding only records itself
    assert preemption.stop_signal_received() == sig.name

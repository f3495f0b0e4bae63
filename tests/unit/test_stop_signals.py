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


CHILD = """
import signal, sys, time
from linnaeus.engine.preemption import watch_launcher
signal.signal(signal.SIGTERM, lambda *a: None)  # a rank whose main thread never gets to act on the flag
watch_launcher(poll_s=0.1)
print("watching", flush=True)
time.sleep(600)
"""
PARENT = """
import subprocess, sys
# stderr: a pipe to this process, broken once it is killed (as a launcher's pipes are)
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "watching"
print(child.pid, flush=True)
import time; time.sleep(600)
"""


def test_a_launched_process_whose_launcher_is_killed_exits_after_the_grace_period() -> None:
    import subprocess
    import sys
    import time

    from launch_utils import running

    env = dict(os.environ, LOCAL_RANK="0", LINNAEUS_ORPHAN_GRACE_S="1")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], env=env, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: the launcher can forward nothing
    parent.wait(timeout=30)
    deadline = time.time() + 30
    while running(child) and time.time() < deadline:
        time.sleep(0.1)
    gone = not running(child)
    if not gone:
        os.kill(child, signal.SIGKILL)
    assert gone

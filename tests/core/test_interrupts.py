"""A Ctrl-C that a library swallows is raised again at the command's next step."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fedmtl import interrupts


@pytest.fixture
def installed():
    old = signal.getsignal(signal.SIGINT)
    interrupts.install()
    yield
    signal.signal(signal.SIGINT, old)
    try:  # leave nothing recorded for later tests in this process (Job.run checks)
        interrupts.check()
    except KeyboardInterrupt:
        pass


def _swallowing_library_call() -> None:
    """What some libraries do: catch BaseException around their work and carry on."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the KeyboardInterrupt arrives here
    except BaseException:  # noqa: BLE001 - the behaviour under test
        pass


def test_a_swallowed_ctrl_c_is_raised_at_the_next_check(installed):
    # Execute: the interrupt is lost inside the library call
    _swallowing_library_call()
    # Assert: the next step raises it, once
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()
    interrupts.check()  # forgotten after it was raised


def test_without_a_ctrl_c_check_does_nothing(installed):
    interrupts.check()


def test_a_ctrl_c_that_propagates_is_still_a_keyboard_interrupt(installed):
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)

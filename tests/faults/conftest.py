"""The fault tests run in the same lab as the end-to-end tests.

A fault test that stops a process (SIGSTOP, a ptrace stop) and fails before
it lets that process go would leave it for every later test to trip over
(a stopped agent keeps ``agent_pids`` non-empty for minutes): the failure
would show up again under other names. After each test, any of the lab's
tug processes still stopped is let go and the test errors, naming them.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from ..e2e.conftest import lab  # noqa: F401  (the session-wide lab fixture)
from .harness import _cmdline, signal_all, stopped_on


@pytest.fixture(autouse=True)
def no_stopped_processes_left() -> Iterator[None]:
    yield
    left = sorted(set(stopped_on("a")) | set(stopped_on("b")))
    if left:
        what = [f"{pid} {' '.join(_cmdline(pid))!r}" for pid in left]
        signal_all(left, signal.SIGCONT)
        pytest.fail(f"the test left stopped processes (now continued): {what}")

"""Deadlines for tests that wait on other processes: generous, and every one scaled by one factor.

A deadline only decides how long a hung process is waited for before the test fails: every wait ends as
soon as its condition holds, so a large deadline costs nothing when things work. The base values are about
three times what the step takes on an idle 2-core machine; `ALECTRA_TEST_TIMEOUT_SCALE` (default 1)
multiplies them all, e.g. 4 beside another busy job (runs took twice as long at load 9 on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

SCALE = float(os.environ.get("ALECTRA_TEST_TIMEOUT_SCALE", "1"))


def deadline(seconds: float) -> float:
    """`seconds` times ALECTRA_TEST_TIMEOUT_SCALE: pass it to every timeout= of a test."""
    return seconds * SCALE


def wait_until(
    condition: Callable[[], bool],
    seconds: float,
    *,
    what: str,
    proc: subprocess.Popen | None = None,
    poll: float = 0.05,
) -> None:
    """Return as soon as `condition()` holds; fail after `deadline(seconds)`, or at once (with its output)
    when `proc`, the process expected to make it hold, has ended first."""
    end = time.monotonic() + deadline(seconds)
    while not condition():
        if proc is not None and proc.poll() is not None:
            output = proc.communicate()[0] if proc.stdout else ""
            raise AssertionError(f"the process ended before {what}:\n{(output or '')[-4000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline(seconds):.0f} s waiting for {what}")
        time.sleep(poll)

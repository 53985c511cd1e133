"""Waiting for a condition in a test: one polling loop for every test directory."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(what: str, fn: Callable[[], T], timeout: float = 60.0, interval: float = 0.2) -> T:
    """Poll fn() until it returns something truthy, and return that. fn runs once more at the deadline
    (a loaded machine's last sleep does not cost the answer); the failure names `what` and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)

"""How long to wait before replacing a trainer pod that failed.

Exponential, like batch/v1 Job: base, 2 x base, 4 x base ... capped at six minutes, counted by the
job's restarts so far. A crash loop (bad node, flaky storage) then costs minutes of back-off instead
of every restart in a few seconds. Disruptions (see disruption.py) are replaced without waiting.
The operator setting RLHF_RESTART_BACKOFF_SECONDS sets the base (default 10 s, 0 = no wait).
"""

from __future__ import annotations

import datetime as dt

DEFAULT_BASE_SECONDS = 10.0
MAX_SECONDS = 360.0


def delay_seconds(restart: int, base: float = DEFAULT_BASE_SECONDS, cap: float = MAX_SECONDS) -> float:
    """Back-off before restart number `restart` (1 = the first restart)."""
    if base <= 0:
        return 0.0
    return min(cap, base * 2 ** min(max(0, restart - 1), 32))


def next_attempt(failed_at: dt.datetime, restart: int, base: float = DEFAULT_BASE_SECONDS) -> dt.datetime:
    return failed_at + dt.timedelta(seconds=delay_seconds(restart, base))


def seconds_text(seconds: float) -> str:
    return f"{seconds:g}s"

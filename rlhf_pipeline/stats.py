"""Small statistics for the summary: is a curve's rise bigger than its noise, how sure is an accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_sd(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (the spread) and count."""
    n = len(values)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0}
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "n": n}


def quarters(values: Sequence[float]) -> dict | None:
    """First- and last-quarter mean and spread of a per-iteration curve, and the rise between them.

    `rise_se` is the standard error of the rise (sd/sqrt(n) of each quarter, combined), so `rise / rise_se`
    says how many noise units the curve moved. None with fewer than 4 points (no quarters to compare).
    """
    n = len(values)
    if n < 4:
        return None
    q = max(1, n // 4)
    first, last = mean_sd(values[:q]), mean_sd(values[-q:])
    rise = last["mean"] - first["mean"]
    se = math.sqrt(first["sd"] ** 2 / first["n"] + last["sd"] ** 2 / last["n"])
    return {"first": first, "last": last, "rise": rise, "rise_se": se,
            "rise_in_se": rise / se if se > 0 else None, "points": n}


def binomial_se(p: float, n: int) -> float | None:
    """Standard error of an accuracy p measured on n independent pairs."""
    if n <= 0 or p is None:
        return None
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def smooth(values: Sequence[float], window: int | None = None) -> list[float]:
    """Centred moving average (the window shrinks at the ends), default window ~ a sixth of the curve."""
    n = len(values)
    if window is None:
        window = max(3, n // 6)
    half = window // 2
    out = []
    for i in range(n):
        part = values[max(0, i - half): i + half + 1]
        out.append(sum(part) / len(part))
    return out

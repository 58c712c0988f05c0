"""The percentile every benchmark reports: nearest rank, ``ceil(q x n)``-th smallest.

``values[int(q x n)]``, used before, was one rank too high whenever ``q x n`` was whole: of
500 latencies its "p99" was the 4th slowest, not the 5th, and its median the upper one."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0 < q <= 1) of ``ordered`` (sorted ascending); nan when empty."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

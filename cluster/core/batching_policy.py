"""Batching policy: which queued texts form the next batch, how many, in which forward
passes, and whether a request still fits in a replica's queue. Pure; no Ray, no torch.

Length-aware selection: a batch is padded to its longest text, so mixing a 5-token and a
60-token sentence makes the 5-token one cost 60. The oldest queued text always goes next
(nothing starves); the rest of the batch are the queued texts nearest to it in length.

Adaptive size: Clipper's AIMD on measured batch latency.

A replica asks, after every batch, how large the next one may be. While batches finish
inside the latency target and come back full (there is more work waiting), the limit grows
by a fixed step; as soon as one batch overruns the target, it shrinks by a factor. The
limit therefore settles just under the largest batch that meets the target on this
hardware, for this model and these texts, without anyone tuning a knob.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AIMDPolicy:
    target_batch_latency_s: float
    min_batch_size: int = 1
    max_batch_size: int = 256
    additive_step: int = 4
    backoff: float = 0.8

    def __post_init__(self):
        if self.target_batch_latency_s <= 0:
            raise ValueError(f"target_batch_latency_s must be > 0, got {self.target_batch_latency_s!r}")
        if not 1 <= self.min_batch_size <= self.max_batch_size:
            raise ValueError(f"need 1 <= min_batch_size <= max_batch_size, got {self.min_batch_size!r}, "
                             f"{self.max_batch_size!r}")
        if not 0 < self.backoff < 1:
            raise ValueError(f"backoff must be in (0, 1), got {self.backoff!r}")
        if self.additive_step < 1:
            raise ValueError(f"additive_step must be >= 1, got {self.additive_step!r}")


def next_batch_size(policy: AIMDPolicy, limit: int, batch_size: int, batch_latency_s: float) -> int:
    """The batch-size limit after a batch of ``batch_size`` (under ``limit``) took ``batch_latency_s``."""
    if batch_latency_s > policy.target_batch_latency_s:
        shrunk = int(limit * policy.backoff)
        return max(policy.min_batch_size, min(shrunk, limit - 1))
    if batch_size >= limit:  # full and fast: there may be room for more
        return min(policy.max_batch_size, limit + policy.additive_step)
    return limit  # a partial batch says nothing about larger ones


def select_batch(lengths: list[int], limit: int) -> list[int]:
    """Queue positions (ascending) of the next batch: the oldest item plus the ``limit - 1``
    others whose lengths are nearest to it (older wins ties). The caller decides how far
    into the queue to look by how many lengths it passes."""
    if not lengths or limit < 1:
        return []
    anchor = lengths[0]
    nearest = sorted(range(1, len(lengths)), key=lambda i: (abs(lengths[i] - anchor), i))[: limit - 1]
    return sorted([0, *nearest])


# What one more forward pass costs, in padded tokens: beside its rows' arithmetic, a pass
# runs every layer's operators once more. Rows of MiniLM-L6 (SST-2 dev texts, 25 tokens on
# average, 55 at most; one thread, texts/s of random batches, padded whole -> in passes at a
# cost of 16 / 64 / 128 / 256 tokens a pass): bf16, batch 32, 145 -> 197 / 209 / 199 / 195;
# batch 16, 149 -> 179 / 191 / 195 / 160; fp32, batch 32, 81 -> 125 / 123 / 118 / 113.
PASS_COST_TOKENS = 64


def forward_passes(lengths: Sequence[int], max_rows: int, pass_cost: int = PASS_COST_TOKENS) -> list[list[int]]:
    """A tokenized batch's rows (``lengths``: each row's real tokens) in forward passes of at
    most ``max_rows`` rows, each padded only to its own longest row; rows ascending within a
    pass, passes by length. A batch is padded to its longest text, so a 5-token sentence
    beside a 60-token one costs 60; in length order, the cuts between passes are those that
    make the fewest padded tokens plus ``pass_cost`` a pass (dynamic programming over the
    cut points: rows x max_rows steps)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows!r}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    sorted_lengths = [lengths[i] for i in order]
    cost = [0] + [math.inf] * len(order)  # cost[j]: the first j rows (in length order), in passes
    cut = [0] * (len(order) + 1)  # where the last of those passes starts
    for end in range(1, len(order) + 1):
        for start in range(max(0, end - max_rows), end):
            total = cost[start] + (end - start) * sorted_lengths[end - 1] + pass_cost
            if total < cost[end]:
                cost[end], cut[end] = total, start
    passes, end = [], len(order)
    while end > 0:
        passes.append(sorted(order[cut[end]:end]))
        end = cut[end]
    return passes[::-1]


# Admission: a replica's bound on requests held (4 x max_batch_size plus max_queued_requests)
# counts requests, not texts, and took 1,152 requests of 64 texts each, which waited
# request_timeout_s and timed out (counted against the version, alerting as a hung model)
# where an immediate 503 was due.
RECENT_BATCHES = 16  # the batches a unit of work's cost is taken from


def work_units(texts: Sequence[str], max_tokens: int, window_stride: int | None = None) -> int:
    """The work ``texts`` are, in tokens as their characters estimate them (about four a token,
    two for the special ones), each cut at ``max_tokens`` as the model reads it, or, for a
    task that reads a long text in windows sharing ``window_stride`` tokens, that many windows
    of ``max_tokens``. Counted in texts, a request of 64 texts of 2,000 characters was let in
    at short texts' cost and timed out, and after long texts, 64 short ones were refused that
    took 0.2 s."""
    units = 0
    for text in texts:
        tokens = len(text) // 4 + 2
        if window_stride is None or tokens <= max_tokens:
            units += min(tokens, max_tokens)
        else:
            units += max_tokens * (1 + math.ceil((tokens - max_tokens) / max(1, max_tokens - window_stride)))
    return units


def unit_seconds(batches: Sequence[tuple[float, int]]) -> float | None:
    """Compute seconds a unit of work takes: over recent batches, (seconds, units) each, their
    seconds over their units; None before one ran. Lone texts' batches cost more a unit than
    full ones: an estimate that errs towards a 503 (with Retry-After) over a timeout."""
    units = sum(n for _, n in batches)
    return sum(s for s, _ in batches) / units if units else None


def over_capacity(held_units: int, new_units: int, per_unit: float | None, oldest_wait_s: float,
                  timeout_s: float) -> str | None:
    """Why a request of ``new_units`` of work should be refused at once, or None: beside
    ``held_units``, it would take past ``timeout_s`` at ``per_unit``, or the oldest queued
    text has waited half of it already. An idle replica takes any request."""
    if not held_units:
        return None
    if per_unit is not None and (held_units + new_units) * per_unit > timeout_s:
        return f"about {(held_units + new_units) * per_unit:.0f}s of work held"
    if oldest_wait_s > timeout_s / 2:
        return f"its oldest queued text has waited {oldest_wait_s:.1f}s"
    return None

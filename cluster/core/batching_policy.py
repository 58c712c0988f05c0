"""Batching policy: which queued texts form the next batch, how many, and whether a request
still fits in a replica's queue. Pure; no Ray, no torch.

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


# Admission: a replica's bound on requests held (4 x max_batch_size plus max_queued_requests)
# counts requests, not texts, and took 1,152 requests of 64 texts each, which waited
# request_timeout_s and timed out (counted against the version, alerting as a hung model)
# where an immediate 503 was due.
BACKLOG_BATCHES = 16  # the recent full batches a text's cost is taken from
BACKLOG_BATCH_TEXTS = 8  # a batch of at least this many texts (or the limit, if lower) is a backlog's


def text_seconds(batches: Sequence[tuple[float, int]]) -> float | None:
    """Compute seconds a text takes when texts queue: over recent batches of a backlog,
    (seconds, texts) each, their seconds over their texts; None before one ran. Not lone
    texts' batches, which cost several times a text in a full one (refusing a first burst
    the replica had time for), nor the cheapest batch ever (a run of short texts then let
    in long ones that all timed out)."""
    texts = sum(n for _, n in batches)
    return sum(s for s, _ in batches) / texts if texts else None


def over_capacity(held_texts: int, new_texts: int, per_text: float | None, oldest_wait_s: float,
                  timeout_s: float) -> str | None:
    """Why a request of ``new_texts`` should be refused at once, or None: beside
    ``held_texts``, the texts would take past ``timeout_s`` at ``per_text``, or the oldest
    queued text has waited half of it already (a shift to longer texts that the cost per
    text has not caught up with). An idle replica takes any request."""
    if not held_texts:
        return None
    if per_text is not None and (held_texts + new_texts) * per_text > timeout_s:
        return f"{held_texts} texts waiting, about {(held_texts + new_texts) * per_text:.0f}s of work"
    if oldest_wait_s > timeout_s / 2:
        return f"{held_texts} texts waiting, the oldest for {oldest_wait_s:.1f}s"
    return None

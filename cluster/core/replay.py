"""Replay: what a retrain trains on, so that its cost follows fresh data and not history,
and what it learned before is not forgotten. Pure: lists in, indices out.

A job trains on the feedback that arrived since its parent's training (``fresh``), minus
its newest share, which is kept back to compare candidate and production on rows neither
trained on (by arrival time: a client cannot choose them). Beside it, a **replay** sample
of what came earlier -- the seed data and a reservoir of all earlier feedback -- stratified
by label, ``replay_ratio`` rows per fresh row, within ``max_rows_per_job``. Kept-back rows
are fresh for the next job, so every accepted feedback row is trained on by some later
version.

The reservoir holds a uniform sample of all feedback ever trained on, at most
``reservoir_size`` rows (Vitter's algorithm R): each version carries its own, so a job reads
the parent's reservoir and the seed file, never the whole history.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def kept_back(fresh_rows: int, eval_fraction: float) -> int:
    """How many of the newest fresh rows are evaluation-only in this job."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    return int(fresh_rows * eval_fraction)


def replay_quota(fresh_train_rows: int, ratio: float, max_rows: int) -> int:
    """Replay rows beside ``fresh_train_rows`` fresh ones: ``ratio`` per fresh row, so that
    fresh and replay together stay within ``max_rows`` (fresh rows first)."""
    return max(0, min(round(fresh_train_rows * ratio), max_rows - fresh_train_rows))


def stratified_sample(labels: Sequence[str], k: int, rng: random.Random) -> list[int]:
    """``k`` indices of ``labels`` (all of them if fewer), each label getting its share of
    the sample, every present label at least one when ``k`` allows. A share's whole part is
    given; the slots left over go to labels drawn by ``rng`` with the chance the share they
    lack (``_draw``): given to the largest remainders, ties by name, the same classes took
    them in every job (4 replay slots, 12 intents of equal size: the same 4 replayed in each
    of 20 jobs, the other 8 never)."""
    n = len(labels)
    if k >= n:
        return list(range(n))
    if k <= 0:
        return []
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    groups = sorted(by_label.items())
    exact = {label: len(members) * k / n for label, members in groups}
    counts = {label: int(share) for label, share in exact.items()}
    if k >= len(groups):
        for label, _ in groups:
            counts[label] = max(counts[label], 1)
    lacking = {label: exact[label] - counts[label] for label in counts if exact[label] > counts[label]}
    for label in _draw(lacking, k - sum(counts.values()), rng):
        counts[label] += 1
    while sum(counts.values()) > k:  # labels given one they lacked: taken back from the largest
        top = max(counts.values())
        counts[rng.choice([label for label, c in counts.items() if c == top])] -= 1
    picked: list[int] = []
    for label, members in groups:
        picked.extend(rng.sample(members, counts[label]))
    return sorted(picked)


def _draw(weights: dict[str, float], slots: int, rng: random.Random) -> list[str]:
    """``slots`` distinct keys of ``weights`` (each below 1), key i drawn with chance
    ``slots * w_i / sum(w)``: ``w_i`` itself when the weights sum to ``slots``, as the shares
    left over do. Systematic sampling over the keys in a random order: one uniform number,
    steps of 1 along the weights laid end to end; none for ``slots`` of 0 or less."""
    total = sum(weights.values())
    if slots <= 0 or total <= 0:
        return []
    keys = sorted(weights)
    rng.shuffle(keys)
    start, at, drawn = rng.random(), 0.0, []

    def points_below(x: float) -> int:  # how many of start, start + 1, ... lie below x
        return max(0, math.ceil(x - start))

    for key in keys:
        at_next = at + weights[key] * slots / total
        if points_below(at_next) > points_below(at):  # a point in [at, at_next): one at most
            drawn.append(key)
        at = at_next
    return drawn[:slots]


def reservoir_update(reservoir: list[T], seen: int, new: Sequence[T], capacity: int,
                     rng: random.Random) -> tuple[list[T], int]:
    """Algorithm R: after it, ``reservoir`` is a uniform sample of all ``seen + len(new)``
    items, at most ``capacity`` of them. Returns the new reservoir and count. A reservoir
    larger than ``capacity`` (the config lowered it) is first cut to a uniform sample of
    ``capacity``: still a uniform sample of everything seen."""
    out = list(reservoir) if len(reservoir) <= capacity else rng.sample(list(reservoir), capacity)
    for item in new:
        seen += 1
        if seen <= capacity:  # every item so far fits
            out.append(item)
            continue
        # A reservoir short of capacity after ``seen`` passed it lost rows (a newer answer
        # replaced them, a golden text took them out): the gaps are slots like any other,
        # each new item's chance capacity/seen. Filling them first kept a job's first rows
        # every time (52% against 1.3% for the rest, 5 gaps a job at capacity 100).
        j = rng.randrange(seen)
        if j < len(out):
            out[j] = item
        elif j < capacity:
            out.append(item)
    return out, seen

"""What the feedback says: the duplicate rule, and the statistics per label, version and day.

The duplicate rule: **latest wins**. A second feedback on the same prediction is stored (the
log keeps everything that was acknowledged), and every reader -- training, statistics --
counts only the newest feedback per prediction id. Feedback given as model + text has no
prediction to collide with and always counts.

Pure: rows in, numbers out; no Ray, no torch, no I/O.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from tuneloop.core.tasks import Task


UNDATED = "undated"  # by_day's entry for rows another tool stored without created_at
_BEFORE_ANY = datetime.min.replace(tzinfo=UTC)


def arrival_order(row: dict[str, Any]) -> tuple[datetime, str]:
    """Where ``row`` stands in arrival order, (created_at, feedback_id). A row another tool
    stored without either (a backfill, which the store keeps) stands first: comparing its
    None with a time stopped the ingress at every start."""
    return row.get("created_at") or _BEFORE_ANY, row.get("feedback_id") or ""


def superseded(rows: Iterable[dict[str, Any]]) -> set[str]:
    """Feedback ids that a later feedback on the same prediction replaces."""
    newest: dict[str, tuple[Any, str]] = {}
    out: set[str] = set()
    for row in rows:
        pid = row.get("prediction_id")
        if pid is None:
            continue
        key = arrival_order(row)
        if pid not in newest:
            newest[pid] = key
        elif key > newest[pid]:
            out.add(newest[pid][1])
            newest[pid] = key
        else:
            out.add(row["feedback_id"])
    out.discard("")  # rows without an id (a backfill's) cannot be named: they stay
    out.discard(None)
    return out


class FeedbackTally:
    """The statistics of ``feedback_stats``, kept up to date one record at a time, so that
    reading them (a Prometheus scrape, the stats endpoint) costs the same whatever the
    amount of feedback stored. The writer folds in each record it stores; a restarted
    writer folds in what is on disk once. Memory: one small entry per prediction id that
    has feedback (for the latest-wins rule: the record less its text), none per record."""

    def __init__(self, model: str, task: Task):
        self.model, self.task = model, task
        self.superseded = 0
        self._total = 0  # records that count (a record may count under several labels)
        self._labels: Counter[str] = Counter()
        self._days: Counter[str] = Counter()
        self._versions: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # [feedback, agreed]
        # version -> label -> {right, wrong, missed}: online precision and recall per label
        self._outcomes: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
        self._newest: dict[str, tuple[tuple[Any, str], dict[str, Any]]] = {}  # prediction id -> (order, row)

    def add(self, row: dict[str, Any]) -> None:
        pid = row.get("prediction_id")
        if pid is not None:
            order = arrival_order(row)
            current = self._newest.get(pid)
            if current is not None:
                self.superseded += 1
                if order < current[0]:
                    return  # an older record that arrived late: it never counted
                self._count(current[1], -1)
            # Without its text (up to max_chars_per_input): what _count reads of it is small.
            self._newest[pid] = (order, {k: v for k, v in row.items() if k != "text"})
        self._count(row, +1)

    def add_all(self, rows: Iterable[dict[str, Any]]) -> FeedbackTally:
        for row in rows:
            self.add(row)
        return self

    def _count(self, row: dict[str, Any], sign: int) -> None:
        self._total += sign
        for label in self.task.feedback_labels(row):
            self._labels[label] += sign
        self._days[row["created_at"].strftime("%Y-%m-%d") if row.get("created_at") else UNDATED] += sign
        if row.get("version") is not None:
            tally = self._versions[row["version"]]
            tally[0] += sign
            tally[1] += sign * int(self.task.agrees(row))
            for label, outcome in self.task.label_outcomes(row):
                self._outcomes[row["version"]][label][outcome] += sign

    def _label_quality(self, version: str) -> dict[str, dict[str, Any]]:
        """Each label's online precision (of what the version served as it, the share users
        confirmed) and recall (of what users said it was, the share the version served)."""
        return {label: _quality(c) for label, c in sorted(self._outcomes[version].items()) if any(c.values())}

    def stats(self) -> dict[str, Any]:
        by_label = {k: n for k, n in sorted(self._labels.items()) if n}
        return {
            "model": self.model,
            "total": self._total,
            "superseded": self.superseded,
            "by_label": by_label,
            "by_version": {
                v: {"feedback": n, "agreed": agreed, "online_accuracy": agreed / n,
                    "by_label": self._label_quality(v)}
                for v, (n, agreed) in sorted(self._versions.items()) if n
            },
            "by_day": {k: n for k, n in sorted(self._days.items()) if n},
        }


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _quality(c: Counter[str]) -> dict[str, Any]:
    right, wrong, missed = c["right"], c["wrong"], c["missed"]
    return {"right": right, "wrong": wrong, "missed": missed,
            "precision": _ratio(right, right + wrong), "recall": _ratio(right, right + missed)}


def feedback_stats(model: str, task: Task, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts by label, by serving version and by day, and each version's online accuracy:
    the share of feedback on its predictions that agrees with what it served (as ``task``
    judges agreement)."""
    return FeedbackTally(model, task).add_all(rows).stats()

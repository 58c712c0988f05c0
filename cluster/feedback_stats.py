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
from typing import Any


def superseded(rows: Iterable[dict[str, Any]]) -> set[str]:
    """Feedback ids that a later feedback on the same prediction replaces."""
    newest: dict[str, tuple[Any, str]] = {}
    out: set[str] = set()
    for row in rows:
        pid = row.get("prediction_id")
        if pid is None:
            continue
        key = (row["created_at"], row["feedback_id"])
        if pid not in newest:
            newest[pid] = key
        elif key > newest[pid]:
            out.add(newest[pid][1])
            newest[pid] = key
        else:
            out.add(row["feedback_id"])
    return out


def feedback_stats(model: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts by label, by serving version and by day, and each version's online accuracy:
    the share of feedback on its predictions that agrees with what it served."""
    drop = superseded(rows)
    counted = [r for r in rows if r["feedback_id"] not in drop]
    by_label = Counter(r["label"] for r in counted)
    by_day = Counter(r["created_at"].strftime("%Y-%m-%d") for r in counted)
    per_version: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in counted:
        if r.get("version") is None:
            continue
        tally = per_version[r["version"]]
        tally[0] += 1
        tally[1] += int(r["label"] == r.get("predicted_label"))
    return {
        "model": model,
        "total": len(counted),
        "superseded": len(drop),
        "by_label": dict(sorted(by_label.items())),
        "by_version": {
            v: {"feedback": n, "agreed": agreed, "online_accuracy": agreed / n}
            for v, (n, agreed) in sorted(per_version.items())
        },
        "by_day": dict(sorted(by_day.items())),
    }

"""A rollout's evidence from what was stored: feedback rows, shadow answers, health counters.

Only feedback on predictions made since the stage started counts (``predicted_at``), and
only the newest feedback per prediction (``feedback_stats.superseded``, the latest-wins
rule every reader follows). Pure: rows in, ``Evidence`` out; control/rollout_driver.py does
the reading.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from tuneloop.core.feedback_stats import superseded
from tuneloop.core.rollout import Evidence, Rollout, VersionHealth
from tuneloop.core.tasks import Task


def stage_feedback(rows: Iterable[dict[str, Any]], stage_started: datetime) -> list[dict[str, Any]]:
    """The stage's feedback on predictions: made since it started, newest per prediction."""
    on_predictions = [r for r in rows if r.get("prediction_id") and r.get("predicted_at") is not None
                      and r["predicted_at"] >= stage_started]
    replaced = superseded(on_predictions)
    return [r for r in on_predictions if r["feedback_id"] not in replaced]


def evidence(task: Task, production: str, rollout: Rollout, feedback: list[dict[str, Any]],
             shadow_answers: Mapping[str, dict[str, Any]], health: Mapping[str, VersionHealth]) -> Evidence:
    """``feedback``: the stage's (``stage_feedback``); ``shadow_answers``: the challenger's
    logged shadow answer by prediction id (shadow only); ``health``: each version's counts
    since the stage started (in shadow the challenger's are its shadow runs)."""
    mine, theirs = health.get(rollout.version, VersionHealth()), health.get(production, VersionHealth())
    common = {"production_requests": int(theirs.requests), "production_errors": int(theirs.errors),
              "challenger_requests": int(mine.requests), "challenger_errors": int(mine.errors),
              "challenger_load_failures": int(mine.load_failures), "challenger_resident": mine.resident}
    if rollout.stage == "shadow":
        pairs = production_only = challenger_only = 0
        for row in feedback:
            shadow = shadow_answers.get(row["prediction_id"])
            if row.get("version") != production or shadow is None:
                continue
            pairs += 1
            production_right = task.agrees(row)
            challenger_right = task.agrees({**row, **task.predicted(shadow)})
            production_only += production_right and not challenger_right
            challenger_only += challenger_right and not production_right
        # Shadow answers reach no user: their latency is not compared (the canary's is).
        return Evidence(paired=True, pairs=pairs, production_only=production_only, challenger_only=challenger_only,
                        **common)
    counts = {production: [0, 0], rollout.version: [0, 0]}
    for row in feedback:
        if row.get("version") in counts:
            counts[row["version"]][0] += 1
            counts[row["version"]][1] += int(task.agrees(row))
    return Evidence(paired=False, production_feedback=counts[production][0], production_agreed=counts[production][1],
                    challenger_feedback=counts[rollout.version][0], challenger_agreed=counts[rollout.version][1],
                    production_p99_s=theirs.p99_s(), challenger_p99_s=mine.p99_s(), **common)

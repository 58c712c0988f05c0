"""Feedback-to-serving time: how long the newest feedback a version learned from took to
reach all of its model's traffic, split into the phases an operator can act on. Pure.

    newest feedback ─ waiting_for_trigger ─ job created ─ queueing ─ training starts ─ training
    ─ (evaluation, measured inside the workers, plus the gate) ─ gate decided ─ publishing
    ─ published ─ optimizing (building and checking the version's ONNX, int8 and bf16
    artifacts) ─ optimized ─ rollout (promotion, then every running replica loading it)

Queueing covers the job's lease, settling the journal into Parquet, reading its data and
waiting for CPUs. A phase is None when it did not happen (no new feedback: nothing waited;
not promoted or nothing serving: no rollout); the total needs both ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel

PHASES = ("waiting_for_trigger", "queueing", "training", "evaluation", "publishing", "optimizing", "rollout")


class ServingTime(BaseModel):
    newest_feedback_at: str | None = None  # the newest feedback the version trained on
    serving_all_at: str | None = None  # every running replica answers with the version
    phases: dict[str, float | None]
    total_s: float | None = None

    def describe(self) -> str:
        """One line: the total, then each phase that happened, in order."""
        phases = ", ".join(f"{name} {self.phases[name]:.1f} s" for name in PHASES if self.phases.get(name) is not None)
        why = "not rolled out" if self.serving_all_at is None else "no new feedback to time it from"
        total = f"{self.total_s:.1f} s" if self.total_s is not None else f"not measured ({why})"
        return f"{total} ({phases})"


@dataclass(frozen=True)
class JobMoments:
    """When a job reached each step (the launcher notes them as it goes)."""

    created: datetime
    training_started: datetime
    training_ended: datetime
    evaluation_s: float  # measured by the workers inside the training run
    gated: datetime
    published: datetime
    optimized: datetime | None = None  # its artifacts built (None: the job built none)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, (end - start).total_seconds()), 3)


def serving_time(newest_feedback: datetime | None, job: JobMoments, serving_all: datetime | None) -> ServingTime:
    """The phases of one version's way to serving. Training excludes the evaluation passes
    that run inside the training run (they are counted under evaluation)."""
    run_s = _seconds(job.training_started, job.training_ended) or 0.0
    evaluation_s = min(job.evaluation_s, run_s)
    phases = {
        "waiting_for_trigger": _seconds(newest_feedback, job.created),
        "queueing": _seconds(job.created, job.training_started),
        "training": round(run_s - evaluation_s, 3),
        "evaluation": round(evaluation_s + (_seconds(job.training_ended, job.gated) or 0.0), 3),
        "publishing": _seconds(job.gated, job.published),
        # Counted under rollout once: 33 of a rollout's 34.5 s were the artifacts.
        "optimizing": _seconds(job.published, job.optimized),
        "rollout": _seconds(job.optimized or job.published, serving_all),
    }
    return ServingTime(
        newest_feedback_at=newest_feedback.isoformat(timespec="milliseconds") if newest_feedback else None,
        serving_all_at=serving_all.isoformat(timespec="milliseconds") if serving_all else None,
        phases=phases,
        total_s=_seconds(newest_feedback, serving_all),
    )


def rollout_complete(running_replicas: int, switched_at: list[datetime]) -> datetime | None:
    """When the version reached all traffic: the latest switch, once as many replicas have
    switched to it as are running (a replica notes each version it loads); None before.
    Counted, not matched by id (Serve does not name its running replicas to a job): a replica
    that died after switching and was replaced counts twice, so such a rollout can be called
    complete while one replica still has its reload interval to go."""
    if running_replicas <= 0 or len(switched_at) < running_replicas:
        return None
    return max(switched_at)

"""A published version's manifest: what it is, what it was trained on and how it scored,
and what was added to it after publishing (its optimized artifacts, its serving time).

A version's folder holds its weights (``save_pretrained``), ``manifest.json``, written last
(the commit point: a version without one is invisible), the tables it was trained with
under ``data/`` and its optimized runtimes' files under ``artifacts/``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneloop.core.evaluation import EvalMetrics
from tuneloop.core.gate import GateDecision
from tuneloop.core.runtimes import Optimization
from tuneloop.core.serving_time import ServingTime
from tuneloop.core.tasks import label_set
from tuneloop.store.documents import now_iso

MANIFEST = "manifest.json"
DATA_DIR = "data"  # beside the weights: the tables a version was trained with
ARTIFACTS = "artifacts"  # beside the weights: optimized runtimes' files (ONNX), added after publishing


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    version: str
    model: str
    parent: str | None
    base_model: str
    task: str
    labels: list[str]
    training: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: EvalMetrics | None = None
    parent_metrics: EvalMetrics | None = None
    gate: GateDecision | None = None
    status: Literal["accepted", "rejected"] = "accepted"
    job_id: str | None = None
    created_at: str = Field(default_factory=now_iso)
    # Feedback-to-serving time (cluster/core/serving_time.py): written at publishing, and
    # again with the rollout once the version serves all traffic.
    serving_time: ServingTime | None = None
    # Optimized artifacts (ONNX, int8) with their parity checks and every runtime's speed:
    # written by ``tuneloop optimize`` (or the job) after publishing, before serving.
    optimization: Optimization | None = None
    # A distilled student's teacher (``ModelConfig.distill``): its model and production
    # version when the job started, the loss's settings and the teacher's golden metrics.
    distilled_from: dict[str, Any] | None = None

    def trained_for(self, labels: list[str]) -> bool:
        """Whether the version was trained for ``labels`` (in any order; a token classifier's
        types or their BIO tags alike): replicas refuse to serve it otherwise."""
        return label_set(self.task, self.labels) == label_set(self.task, labels)

    def watermark(self) -> tuple[datetime, str] | None:
        """The position, in arrival order (created_at, feedback_id), of the newest feedback
        this version trained on; None for a version that trained on none, or was trained
        before watermarks were recorded (then all feedback is new to its children)."""
        mark = self.data.get("watermark")
        if not isinstance(mark, dict):
            return None
        return datetime.fromisoformat(mark["created_at"]), mark["feedback_id"]


def artifact_entries(optimization: Optimization | None) -> set[str]:
    """The entries of a version's ``artifacts/`` folder that a record's artifacts lie in (a
    build's folder, or a file or runtime folder of builds made before folders per build)."""
    if optimization is None:
        return set()
    return {a.path.split("/")[1] for a in optimization.artifacts.values() if a.path.startswith(f"{ARTIFACTS}/")}

"""The evaluation gate: may a freshly trained version replace production? Pure."""

from __future__ import annotations

from pydantic import BaseModel

from tuneloop.core.evaluation import EvalMetrics


class GateDecision(BaseModel):
    """The gate's verdict on a version, as its manifest records it."""

    accepted: bool
    reason: str


def evaluate_gate(metric: str, candidate: EvalMetrics, production: EvalMetrics | None) -> GateDecision:
    """Accept when the candidate's held-out ``metric`` (the task's gate metric) is not below
    production's on the same data.

    With no production version yet (the first version) there is nothing to protect, so the
    candidate is accepted.
    """
    value = float(getattr(candidate, metric))
    if production is None:
        return GateDecision(accepted=True, reason=f"first version: {metric} {value:.4f}, no production to compare")
    baseline = float(getattr(production, metric))
    if value >= baseline:
        return GateDecision(
            accepted=True,
            reason=f"{metric} {value:.4f} >= production's {baseline:.4f} on the same held-out data",
        )
    return GateDecision(
        accepted=False,
        reason=f"{metric} {value:.4f} < production's {baseline:.4f} on the same held-out data",
    )

"""The evaluation gate: may a freshly trained version replace production? Pure."""

from __future__ import annotations

from pydantic import BaseModel


class GateDecision(BaseModel):
    """The gate's verdict on a version, as its manifest records it."""

    accepted: bool
    reason: str


def evaluate_gate(candidate_accuracy: float, production_accuracy: float | None) -> GateDecision:
    """Accept when the candidate's held-out accuracy is not below production's on the same data.

    With no production version yet (the first version) there is nothing to protect, so the
    candidate is accepted.
    """
    if production_accuracy is None:
        return GateDecision(accepted=True,
                            reason=f"first version: accuracy {candidate_accuracy:.4f}, no production to compare")
    if candidate_accuracy >= production_accuracy:
        return GateDecision(
            accepted=True,
            reason=f"accuracy {candidate_accuracy:.4f} >= production's {production_accuracy:.4f} on the same held-out data",
        )
    return GateDecision(
        accepted=False,
        reason=f"accuracy {candidate_accuracy:.4f} < production's {production_accuracy:.4f} on the same held-out data",
    )

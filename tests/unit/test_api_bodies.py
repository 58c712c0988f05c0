"""The admin bodies' types: strict, as a JSON client sends them (no Serve, no Ray)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tuneloop.serving.api_bodies import RolloutRequest


def test_a_rollout_steps_at_percent_is_a_number_never_a_boolean_or_a_string():
    """``at`` read laxly took ``true`` for 1% and ``"50"`` for 50%: a step "seen at 1%"
    answered a misleading 409 where the body was wrong (422)."""
    assert RolloutRequest(action="step", at=5).at == 5.0
    assert RolloutRequest(action="step", at=12.5).at == 12.5
    assert RolloutRequest(action="step").at is None
    for bad in (True, "50", -1, 101):
        with pytest.raises(ValidationError, match="at"):
            RolloutRequest(action="step", at=bad)

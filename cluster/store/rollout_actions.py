"""What an operator may do to a rollout (admin API, `tuneloop rollout`), in one place.

``start`` a version's rollout (a gated candidate, or any published version), ``pause`` and
``resume`` the automatic decisions, force the next ``step``, or ``rollback`` to production
alone. Each is one registry transition (store/registry.py), recorded with who asked.
"""

from __future__ import annotations

from typing import Literal

from tuneloop.core.errors import Conflict, InvalidBody
from tuneloop.core.rollout import RolloutConfig, Stage, first_stage
from tuneloop.store.registry import Registry
from tuneloop.store.registry_state import RegistryState

RolloutAction = Literal["start", "pause", "resume", "step", "rollback"]


def operate_rollout(registry: Registry, model: str, action: RolloutAction, who: str, rollout: RolloutConfig,
                    labels: list[str], version: str | None = None, stage: Stage | None = None,
                    force: bool = False, request: str | None = None, logs_predictions: bool = True,
                    at: float | None = None) -> RegistryState:
    """``request``: the operator's request id (``Registry._transition``): a retry changes
    nothing, and answers the state as it is. Raises Conflict (409) when the action does not fit the state (no rollout to pause,
    one already under way to start), UnknownVersion (404) for a version never published,
    InvalidBody (422) for a start without a version, or a stage or force with another action.
    ``logs_predictions``: false when ``predictions.sample_rate`` is 0, and a start is a
    Conflict: its stages are judged by feedback on logged predictions, which would never come.
    ``at``: with ``step``, the percent the operator saw the rollout at; a Conflict if it has
    moved since (the controller stepped from 25% to 50% meanwhile: the operator's step
    would have promoted past a stage never judged)."""
    if action == "start":
        if version is None:
            raise InvalidBody('"start" needs the version to roll out ("version": "v2")')
        if not logs_predictions:
            raise Conflict("predictions.sample_rate is 0: a rollout's stages are judged by feedback on logged "
                           "predictions, so it would never advance; raise it, or promote the version")
        mode = stage or (rollout.mode if rollout.mode in ("shadow", "canary") else "shadow")
        first, _, percent = first_stage(mode, rollout.canary_steps)
        return registry.start_rollout(model, version, first, percent, f"started {who}", force=force, labels=labels,
                                      request=request)
    if stage is not None or force:
        raise InvalidBody(f'"stage" and "force" go with "start", not with {action!r}')
    if at is not None and action != "step":
        raise InvalidBody(f'"at" goes with "step", not with {action!r}')
    state = registry.state(model)
    if state.carried_out(request):
        return state  # a retry: the rollout it stepped or ended may be gone, which is no conflict
    current = state.rollout
    if current is None:
        raise Conflict(f"no rollout of {model!r} is under way")
    if version is not None and version != current.version:
        raise Conflict(f"the rollout under way is of {current.version}, not of {version!r}")
    if action == "step":
        if at is not None and at != current.percent:
            where = "in shadow (0% of answers)" if current.stage == "shadow" else f"at canary {current.percent:g}%"
            raise Conflict(f"the rollout of {current.version} is {where}, not at {at:g}%: it moved since you "
                           "looked; look again before stepping")
        return registry.advance_rollout(model, current.version, rollout.canary_steps, f"forced {who}",
                                        request=request, seen=current)
    if action == "rollback":
        return registry.abort_rollout(model, current.version, f"rolled back {who}", request=request)
    return registry.mark_rollout(model, current.version, action, who, request=request)

"""The rollout's automatic decisions, applied: look at each model's rollout, gather its
evidence, ``decide``, and move the registry's state.

The retrain controller runs one ``RolloutDriver`` every ``rollout.evaluate_every_s``. It
reads the stage's feedback from the bucket (compacted within ``feedback.compact_interval_s``),
the challenger's shadow answers from their log (each found once, then kept), and the
versions' serving counters through ``health`` (the ingress gathers them from every node's
replicas); the reading of the look that advanced a stage is the next stage's baseline, the
one its counts are measured from (a stage it did not start, an operator's or one under way
at the controller's start, counts from its first look). Every decision that moves the state is written to the state's history
with the numbers it saw; a hold is logged, and raised once a stage as an alert when overdue.
Its collaborators come through the constructor, so it is unit-tested without Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from tuneloop.core.config import TuneloopConfig
from tuneloop.core.errors import Conflict, CorruptStoredFile
from tuneloop.core.quarantine import ANONYMOUS
from tuneloop.core.rollout import Decision, NodeHealth, Rollout, VersionHealth, decide, health_since
from tuneloop.core.rollout_evidence import evidence, stage_feedback
from tuneloop.core.tasks import model_tasks
from tuneloop.store.quarantine import QuarantineBook
from tuneloop.store.feedback_store import FeedbackStore
from tuneloop.store.records import PredictionLog, prediction_time
from tuneloop.store.registry import Registry

log = logging.getLogger(__name__)
# A prediction this old with no shadow answer logged will not get one: replicas flush their
# logs every second, and a shadow runs when production is idle, within seconds under load.
SHADOW_SETTLE_S = 120.0
Health = Callable[[str], NodeHealth]  # model -> node -> version -> cumulative counts


class RolloutDriver:
    def __init__(self, cfg: TuneloopConfig, registry: Registry, feedback: FeedbackStore, shadow_log: PredictionLog,
                 health: Health, clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.cfg, self.registry, self.feedback, self.shadow_log = cfg, registry, feedback, shadow_log
        self.health, self.clock = health, clock
        self.tasks = model_tasks(cfg.models)
        self._baselines: dict[tuple[str, str, str], NodeHealth] = {}
        self._readings: dict[str, NodeHealth] = {}  # model -> this look's health reading
        self._shadow_answers: dict[str, dict] = {}  # prediction id -> the shadow's answer (found once)
        self._no_shadow: dict[str, str] = {}  # prediction id -> model: old enough, and no shadow answer
        self._said: dict[str, tuple] = {}  # model -> what its last recorded look said

    def look_all(self) -> None:
        for m in self.cfg.models:
            try:
                self.look(m.name)
            except Exception:  # noqa: BLE001 - storage or Serve hiccup: the next look tries again
                log.exception("rollout of %s: look failed", m.name)

    def look(self, model: str) -> Decision | None:
        """One look at ``model``'s rollout; the decision taken (None: no rollout, or paused)."""
        state = self.registry.state(model)
        rollout = state.rollout
        if rollout is None or rollout.stage != "shadow":  # only a shadow stage reads them: a canary's
            # hours would otherwise keep every shadow answer of the stage before, texts and all
            self._shadow_answers = {k: v for k, v in self._shadow_answers.items() if v.get("model") != model}
            self._no_shadow = {k: m for k, m in self._no_shadow.items() if m != model}
        if rollout is None:
            return None
        if rollout.paused or state.production is None:
            return None
        started = datetime.fromisoformat(rollout.stage_started_at)
        # A key the quarantine holds out of training judges no rollout either: agreeing with
        # the challenger and not with production, it promoted it (or the reverse, rolled back).
        # Left out before the newest answer per prediction is taken: after, a held key's answer
        # replaced an honest one and was then dropped, and the prediction counted for nothing.
        try:
            held = QuarantineBook(self.registry.storage).quarantined(model)
        except CorruptStoredFile as e:  # the rollout is still judged (a failing canary rolled back), and said so
            log.error("rollout of %s: %s; judging on every key's feedback until it is repaired", model, e.message)
            held = set()
        rows = stage_feedback([r for r in self.feedback.read_since(model, (started, "")).to_pylist()
                               if (r.get("key_id") or ANONYMOUS) not in held], started)
        shadow = self._find_shadow_answers(model, rollout.version, rows) if rollout.stage == "shadow" else {}
        seen = self._health_since(model, rollout.version, rollout.stage_started_at)
        found = evidence(self.tasks[model], state.production, rollout, rows, shadow, seen)
        decision = decide(self.cfg.rollout, found, (self.clock() - started).total_seconds())
        try:
            self._apply(model, rollout, decision)
        except Conflict as e:  # an operator or another controller moved it meanwhile: theirs stands
            log.info("rollout of %s %s: %s not applied: %s", model, rollout.version, decision.action, e.message)
        self._record_look(model, rollout, decision)
        return decision

    def _record_look(self, model: str, rollout: Rollout, d: Decision) -> None:
        """The look, for `tuneloop rollout` and `tuneloop status`, written when what it says
        changed (a look every ``evaluate_every_s`` saying the same is not written again)."""
        said = (rollout.version, rollout.stage_started_at, d.action, d.reason, d.numbers)
        if self._said.get(model) == said:
            return
        look = {"at": self.clock().isoformat(timespec="seconds"), "version": rollout.version, "stage": rollout.stage,
                "stage_started_at": rollout.stage_started_at, "action": d.action, "reason": d.reason,
                "numbers": d.numbers}
        try:
            self.registry.record_rollout_look(model, look)
        except OSError as e:  # only a status line is late: the decision itself was applied
            log.warning("rollout of %s: could not record the look: %s", model, e)
            return
        self._said[model] = said

    def _apply(self, model: str, judged: Rollout, d: Decision) -> None:
        version = judged.version
        if d.action == "advance":
            state = self.registry.advance_rollout(model, version, self.cfg.rollout.canary_steps, d.reason, d.numbers,
                                                  judged=judged)
            where = "production" if state.rollout is None else f"canary {state.rollout.percent:g}%"
            if state.rollout is not None and model in self._readings:
                # The next stage counts from this look, not from the driver's first look at it
                # (evaluate_every_s later): a canary's first errors at 25% went uncounted.
                self._baselines[(model, version, state.rollout.stage_started_at)] = self._readings[model]
            log.info("rollout of %s %s: advanced to %s (%s)", model, version, where, d.reason)
        elif d.action == "rollback":
            self.registry.abort_rollout(model, version, f"automatic: {d.reason}", d.numbers, judged=judged)
            log.warning("rollout of %s %s: rolled back (%s)", model, version, d.reason)
        elif d.alert and not judged.alerted:
            self.registry.mark_rollout(model, version, "alert", d.reason, d.numbers, judged=judged)
            log.warning("rollout of %s %s: no decision after %.0fs (%s); an operator may step or roll back it", model,
                        version, self.cfg.rollout.inconclusive_after_s, d.reason)
        else:
            log.debug("rollout of %s %s: hold (%s)", model, version, d.reason)

    def _find_shadow_answers(self, model: str, version: str, rows: list[dict]) -> dict[str, dict]:
        """The challenger ``version``'s shadow answers to the rows' predictions. Each is looked
        up until found, or until its prediction is ``SHADOW_SETTLE_S`` old without one (shed
        under load, or outside ``shadow_percent``): every look listed and read the stage's
        misses again, a look growing with the stage. Another version's answer (a replica that
        had not yet reloaded after an operator swapped the challenger) is not this one's."""
        settled = self.clock() - timedelta(seconds=SHADOW_SETTLE_S)
        for row in rows:
            pid = row["prediction_id"]
            if pid in self._shadow_answers or pid in self._no_shadow:
                continue
            answer = self.shadow_log.lookup([model], pid)
            if answer is not None:
                self._shadow_answers[pid] = answer
            elif (at := prediction_time(pid)) is not None and at < settled:
                self._no_shadow[pid] = model
        return {r["prediction_id"]: a for r in rows
                if (a := self._shadow_answers.get(r["prediction_id"])) is not None and a.get("version") == version}

    def _health_since(self, model: str, version: str, stage_started_at: str) -> dict[str, VersionHealth]:
        self._readings.pop(model, None)
        try:
            now = self.health(model)
        except Exception as e:  # noqa: BLE001 - judge on the feedback alone this time
            log.warning("rollout of %s: no health counters this look (%s: %s)", model, type(e).__name__, e)
            return {}
        self._readings[model] = now
        key = (model, version, stage_started_at)
        for old in [k for k in self._baselines if k[0] == model and k != key]:
            del self._baselines[old]  # a stage gone by
        baseline = self._baselines.setdefault(key, now)
        return health_since(now, baseline)

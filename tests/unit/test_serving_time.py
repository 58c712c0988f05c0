"""Feedback-to-serving time (cluster/core/serving_time.py): the phases tile the way from the
newest feedback to every replica serving, and a rollout ends when all running replicas switched."""

from datetime import UTC, datetime, timedelta

from tuneloop.core.serving_time import PHASES, JobMoments, rollout_complete, serving_time

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


MOMENTS = JobMoments(created=_at(30), training_started=_at(35), training_ended=_at(95), evaluation_s=12.0,
                     gated=_at(95.5), published=_at(98))


def test_phases_tile_the_way_from_feedback_to_serving():
    timing = serving_time(T0, MOMENTS, serving_all=_at(101))
    assert list(timing.phases) == list(PHASES)
    assert timing.phases == {"waiting_for_trigger": 30.0, "queueing": 5.0, "training": 48.0,
                             "evaluation": 12.5, "publishing": 2.5, "optimizing": None, "rollout": 3.0}
    assert timing.total_s == 101.0 == sum(s for s in timing.phases.values() if s is not None)
    optimized = JobMoments(**{**MOMENTS.__dict__, "optimized": _at(99.5)})
    timing = serving_time(T0, optimized, serving_all=_at(101))
    assert (timing.phases["optimizing"], timing.phases["rollout"]) == (1.5, 1.5)
    assert timing.total_s == 101.0 == sum(s for s in timing.phases.values() if s is not None)
    assert timing.newest_feedback_at == "2026-11-23T12:00:00.000+00:00"
    assert timing.serving_all_at == "2026-11-23T12:01:41.000+00:00"


def test_what_did_not_happen_is_none_not_zero():
    # No new feedback (a replay-only refresh) and no rollout (rejected, or nothing serving).
    timing = serving_time(None, MOMENTS, serving_all=None)
    assert timing.phases["waiting_for_trigger"] is None and timing.phases["rollout"] is None
    assert timing.total_s is None and timing.phases["training"] == 48.0
    assert timing.describe().startswith("not measured (not rolled out)")
    # Rolled out, with no new feedback to time it from: said so, not "not rolled out".
    assert serving_time(None, MOMENTS, serving_all=_at(101)).describe().startswith(
        "not measured (no new feedback to time it from)")


def test_evaluation_never_exceeds_the_run_it_was_part_of():
    odd = JobMoments(created=_at(0), training_started=_at(1), training_ended=_at(3), evaluation_s=9.0,
                     gated=_at(3), published=_at(4))
    timing = serving_time(T0, odd, serving_all=None)
    assert timing.phases["training"] == 0.0 and timing.phases["evaluation"] == 2.0


def test_rollout_is_complete_when_every_running_replica_switched():
    assert rollout_complete(2, [_at(1)]) is None  # one of two
    assert rollout_complete(2, [_at(1), _at(4)]) == _at(4)
    assert rollout_complete(0, [_at(1)]) is None  # nothing running: nothing to time
    assert rollout_complete(1, [_at(1), _at(2)]) == _at(2)  # a replaced replica switched too

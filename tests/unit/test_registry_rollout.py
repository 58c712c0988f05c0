"""Rollouts in the registry's state: the one owner of production also owns its challenger."""

import pytest

from tuneloop.core.errors import Conflict
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage

STEPS = [5.0, 25.0, 50.0]


@pytest.fixture
def reg(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    registry = Registry(Storage(str(tmp_path / "store")))
    for parent in (None, "v1", "v1"):
        registry.publish("m", str(weights), Manifest(version="pending", model="m", parent=parent, base_model="b",
                                                     task="text-classification", labels=["a", "b"]))
    registry.promote("m", "v1")
    return registry


def test_shadow_then_each_canary_step_then_production(reg):
    state = reg.start_rollout("m", "v2", "shadow", 0, "job j1", expect_production="v1")
    assert (state.production, state.rollout.version, state.rollout.stage) == ("v1", "v2", "shadow")
    seen = []
    for _ in range(len(STEPS)):
        state = reg.advance_rollout("m", "v2", STEPS, "not worse", {"pairs": 120})
        seen.append((state.rollout.stage, state.rollout.percent))
    assert seen == [("canary", 5.0), ("canary", 25.0), ("canary", 50.0)]
    state = reg.advance_rollout("m", "v2", STEPS, "not worse")
    assert (state.production, state.rollout) == ("v2", None)
    assert [h.event for h in state.history] == ["promote", "rollout", "step", "step", "step", "promote"]
    assert state.history[2].numbers == {"pairs": 120}
    assert state.rollback_target() == "v1"  # the steps were never production


def test_rollback_during_a_rollout_ends_it_and_keeps_production(reg):
    reg.start_rollout("m", "v2", "canary", 5.0)
    state = reg.rollback("m", "by key k")
    assert (state.production, state.rollout, state.history[-1].event) == ("v1", None, "abort")
    with pytest.raises(Conflict, match="no earlier production"):
        reg.rollback("m")  # nothing rolled out now, and v1 is the first production


def test_one_rollout_at_a_time_and_only_its_challenger_moves(reg):
    reg.start_rollout("m", "v2", "shadow", 0)
    with pytest.raises(Conflict, match="v2 of 'm' is being rolled out"):
        reg.start_rollout("m", "v3", "shadow", 0)
    with pytest.raises(Conflict, match="v3 of 'm' is not being rolled out"):
        reg.advance_rollout("m", "v3", STEPS)
    reg.abort_rollout("m", "v2")
    with pytest.raises(Conflict, match="production of 'm' is now v1"):  # a job trained from another parent
        reg.start_rollout("m", "v3", "shadow", 0, expect_production="v2")


def test_pause_resume_and_alert_are_flags_in_the_history(reg):
    reg.start_rollout("m", "v2", "canary", 5.0)
    assert reg.mark_rollout("m", "v2", "pause", "by key k").rollout.paused
    started = reg.state("m").rollout.stage_started_at
    resumed = reg.mark_rollout("m", "v2", "resume").rollout
    assert not resumed.paused and resumed.stage_started_at >= started
    generation = reg.state("m").generation
    with pytest.raises(Conflict, match="running already"):  # a second resume, checked under the lock
        reg.mark_rollout("m", "v2", "resume")
    assert reg.state("m").generation == generation and reg.state("m").rollout.stage_started_at == resumed.stage_started_at
    assert reg.mark_rollout("m", "v2", "alert", "inconclusive").rollout.alerted
    assert reg.advance_rollout("m", "v2", STEPS).rollout.alerted is False  # a new stage, a new wait


def test_promoting_by_hand_ends_any_rollout(reg):
    reg.start_rollout("m", "v2", "canary", 5.0)
    state = reg.promote("m", "v3", "by key k")
    assert (state.production, state.rollout) == ("v3", None)
    assert "rollout of v2 ends" in state.history[-1].reason


def test_production_is_not_its_own_challenger(reg):
    with pytest.raises(Conflict, match="is production already"):
        reg.start_rollout("m", "v1", "shadow", 0)
    # Promoting production during a rollout would end it unasked: refused, the rollout goes on.
    reg.start_rollout("m", "v2", "canary", 5.0)
    with pytest.raises(Conflict, match="v1 is production already, and v2 is being rolled out"):
        reg.promote("m", "v1")
    assert reg.state("m").rollout.version == "v2"


def test_a_rollout_needs_a_production_to_roll_out_beside(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    registry = Registry(Storage(str(tmp_path / "store")))
    registry.publish("m", str(weights), Manifest(version="pending", model="m", parent=None, base_model="b",
                                                 task="text-classification", labels=["a", "b"]))
    with pytest.raises(Conflict, match="no production version to roll v1 out beside: promote it") as e:
        registry.start_rollout("m", "v1", "shadow", 0)
    assert e.value.status == 409 and registry.state("m").generation == 0


def test_tuneloop_status_shows_the_rollout_and_the_numbers_decisions_saw(reg, tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from tuneloop.control.cli import app

    reg.start_rollout("m", "v2", "shadow", 0, "by `tuneloop rollout`")
    reg.advance_rollout("m", "v2", STEPS, "automatic: not worse", {"pairs": 120, "lower": -0.01})
    config = tmp_path / "tuneloop.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"]}],
                                      "storage": {"root": str(tmp_path / "store")}}))
    runner = CliRunner()
    shown = runner.invoke(app, ["status", "-c", str(config)])
    assert shown.exit_code == 0, shown.output
    assert "m: production v1; challenger v2 in canary at 5%" in shown.output
    assert "automatic: not worse" in shown.output and "lower=-0.01 pairs=120" in shown.output
    as_json = json.loads(runner.invoke(app, ["status", "m", "--json", "-c", str(config)]).output)
    assert as_json["m"]["rollout"]["percent"] == 5.0 and as_json["m"]["history"][-1]["event"] == "step"
    assert runner.invoke(app, ["status", "nope", "-c", str(config)]).exit_code == 2


def test_an_operators_action_missing_or_misplacing_a_field_is_a_422(reg):
    from tuneloop.core.errors import InvalidBody
    from tuneloop.core.rollout import RolloutConfig
    from tuneloop.store.rollout_actions import operate_rollout

    with pytest.raises(InvalidBody, match='"start" needs the version') as e:
        operate_rollout(reg, "m", "start", "by k", RolloutConfig(), ["a", "b"])
    assert e.value.status == 422
    operate_rollout(reg, "m", "start", "by k", RolloutConfig(), ["a", "b"], "v2", "canary")
    with pytest.raises(InvalidBody, match='"stage" and "force" go with "start", not with \'pause\''):
        operate_rollout(reg, "m", "pause", "by k", RolloutConfig(), ["a", "b"], stage="shadow")
    assert not reg.state("m").rollout.paused  # nothing done


def test_an_operators_retried_request_moves_production_once(reg):
    """A rollback retried after a timeout stepped production back twice (v3 to v2 to v1);
    with the request's id the history holds, the retry answers the state as it is."""
    from tuneloop.core.rollout import RolloutConfig
    from tuneloop.store.rollout_actions import operate_rollout

    reg.promote("m", "v2")
    reg.promote("m", "v3")
    first = reg.rollback("m", "by key k", request="k rollback r1")
    again = reg.rollback("m", "by key k", request="k rollback r1")
    assert first.production == again.production == "v2" and again.generation == first.generation
    assert reg.rollback("m", "by key k", request="k rollback r2").production == "v1"  # a new request acts
    steps = RolloutConfig(mode="canary", canary_steps=[5.0, 25.0, 50.0])
    operate_rollout(reg, "m", "start", "by k", steps, ["a", "b"], "v3", "canary", request="k start s1")
    for _ in range(2):  # a forced step, retried: one step
        state = operate_rollout(reg, "m", "step", "by k", steps, ["a", "b"], request="k step s2")
        assert (state.rollout.stage, state.rollout.percent) == ("canary", 25.0)
    for _ in range(2):  # the rollout's end, retried: no 409 for a rollout that is gone
        state = operate_rollout(reg, "m", "rollback", "by k", steps, ["a", "b"], request="k rollback s3")
        assert (state.production, state.rollout) == ("v1", None)
    assert reg.state("m").history[-1].request == "k rollback s3"


def test_an_operators_step_after_the_controllers_own_is_a_conflict_not_two_stages(reg, monkeypatch):
    """An operator who saw 25% forces a step just as the controller steps to 50%: the
    operator's step promoted the challenger without the 50% stage ever being judged."""
    from tuneloop.core.rollout import RolloutConfig
    from tuneloop.store.rollout_actions import operate_rollout

    steps = RolloutConfig(mode="canary", canary_steps=[5.0, 25.0, 50.0])
    operate_rollout(reg, "m", "start", "by k", steps, ["a", "b"], "v2", "canary")
    operate_rollout(reg, "m", "pause", "by k", steps, ["a", "b"])
    operate_rollout(reg, "m", "step", "by k", steps, ["a", "b"])  # paused: an operator's step still goes
    assert reg.state("m").rollout.percent == 25.0
    operate_rollout(reg, "m", "resume", "by k", steps, ["a", "b"])
    real = reg.advance_rollout

    def controller_steps_first(*args, **kwargs):
        real("m", "v2", steps.canary_steps, "controller")  # between the operator's read and write
        monkeypatch.setattr(reg, "advance_rollout", real)
        return real(*args, **kwargs)

    monkeypatch.setattr(reg, "advance_rollout", controller_steps_first)
    with pytest.raises(Conflict, match="moved on to canary 50% since it was read"):
        operate_rollout(reg, "m", "step", "by k", steps, ["a", "b"])
    state = reg.state("m")
    assert (state.production, state.rollout.percent) == ("v1", 50.0)


def test_an_operators_step_at_the_percent_seen_is_refused_once_the_rollout_moved(reg):
    """The operator saw 25% on the dashboard; the controller stepped to 50% before the
    operator's step was sent: without the percent seen, it promoted past an unjudged stage."""
    from tuneloop.core.errors import InvalidBody
    from tuneloop.core.rollout import RolloutConfig
    from tuneloop.store.rollout_actions import operate_rollout

    steps = RolloutConfig(mode="canary", canary_steps=[5.0, 25.0, 50.0])
    operate_rollout(reg, "m", "start", "by k", steps, ["a", "b"], "v2", "canary")
    operate_rollout(reg, "m", "step", "by k", steps, ["a", "b"], at=5.0)  # as seen: it goes
    reg.advance_rollout("m", "v2", steps.canary_steps, "controller")  # 25% -> 50%, judged
    with pytest.raises(Conflict, match="at canary 50%, not at 25%: it moved since you looked"):
        operate_rollout(reg, "m", "step", "by k", steps, ["a", "b"], at=25.0)
    assert (reg.state("m").production, reg.state("m").rollout.percent) == ("v1", 50.0)
    with pytest.raises(InvalidBody, match='"at" goes with "step"'):
        operate_rollout(reg, "m", "pause", "by k", steps, ["a", "b"], at=50.0)
    reg.abort_rollout("m", "v2")
    operate_rollout(reg, "m", "start", "by k", steps, ["a", "b"], "v2", "shadow")
    with pytest.raises(Conflict, match=r"is in shadow \(0% of answers\), not at 5%"):  # not "at shadow 0%"
        operate_rollout(reg, "m", "step", "by k", steps, ["a", "b"], at=5.0)


def test_a_rollout_is_not_started_when_no_prediction_is_logged(reg):
    """With predictions.sample_rate 0 no feedback can be joined to the canary's answers: the
    rollout sat inconclusive until its alert."""
    from tuneloop.core.rollout import RolloutConfig
    from tuneloop.store.rollout_actions import operate_rollout

    with pytest.raises(Conflict, match="sample_rate is 0") as e:
        operate_rollout(reg, "m", "start", "by k", RolloutConfig(mode="gated"), ["a", "b"], "v2",
                        logs_predictions=False)
    assert e.value.status == 409 and reg.state("m").rollout is None



def test_an_idempotency_key_reused_for_another_body_is_refused_and_changes_nothing(reg):
    """A script reusing one Idempotency-Key to promote v2, then v3, got 200 for the second
    while production stayed at v2."""
    from tuneloop.core.errors import InvalidValue
    from tuneloop.store.registry_state import BODY

    reg.promote("m", "v2", request=f"k promote p1{BODY}aaaa")
    assert reg.promote("m", "v2", request=f"k promote p1{BODY}aaaa").production == "v2"  # the retry
    generation = reg.state("m").generation
    with pytest.raises(InvalidValue, match="'p1' was used for a different request"):
        reg.promote("m", "v3", request=f"k promote p1{BODY}bbbb")
    assert (reg.state("m").production, reg.state("m").generation) == ("v2", generation)
    assert reg.promote("m", "v3", request=f"k promote p2{BODY}bbbb").production == "v3"  # a new key acts
    assert reg.promote("m", "v2", request=f"other promote p1{BODY}bbbb").production == "v2"  # another API key's
    # A retry after an upgrade, of a request carried out before ids had a body: done, not refused.
    reg.rollback("m", "by key k", request="k rollback r1")
    state = reg.state("m")
    assert reg.rollback("m", "by key k", request=f"k rollback r1{BODY}cccc").generation == state.generation


def test_a_dry_run_meets_the_same_checks_and_writes_nothing(reg):
    reg.start_rollout("m", "v2", "canary", 5.0)
    before = reg.state("m")
    with pytest.raises(Conflict, match="v1 is production already, and v2 is being rolled out"):
        reg.promote("m", "v1", dry_run=True)
    assert reg.promote("m", "v3", dry_run=True).production == "v3"  # ends the rollout too
    assert reg.rollback("m", dry_run=True).rollout is None  # a rollback during a rollout ends it
    assert reg.state("m") == before

"""The rollout driver over real storage (registry state, feedback Parquet, the shadow log),
no Ray: feedback on each version decides, the state moves, and health counts since the
stage started can roll a challenger back before any feedback."""

from __future__ import annotations

from pathlib import Path

import random
from datetime import UTC, datetime, timedelta

import pytest

from tuneloop.control.rollout_driver import RolloutDriver
from tuneloop.core.config import parse_config
from tuneloop.core.rollout import VersionHealth
from tuneloop.core.tasks import model_tasks
from tuneloop.store.feedback_store import FeedbackStore
from tuneloop.store.records import SHADOW_ROOT, PredictionLog, new_prediction_id
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage

LABELS = ["negative", "positive"]


class World:
    def __init__(self, tmp_path, mode):
        self.cfg = parse_config({
            "models": [{"name": "m", "base_model": "b", "labels": LABELS}], "storage": {"root": str(tmp_path / "s")},
            "rollout": {"mode": mode, "min_feedback": 60, "canary_steps": [10, 50], "min_requests": 20}})
        storage = Storage(self.cfg.storage.root)
        self.tasks = model_tasks(self.cfg.models)
        self.registry = Registry(storage)
        weights = tmp_path / "w"
        weights.mkdir()
        (weights / "config.json").write_text("{}")
        for _ in range(2):
            self.registry.publish("m", str(weights), Manifest(version="pending", model="m", parent=None,
                                                              base_model="b", task="text-classification",
                                                              labels=LABELS))
        self.registry.promote("m", "v1")
        self.feedback = FeedbackStore(storage, str(tmp_path / "journal"), self.tasks)
        self.feedback.open_writer()
        self.shadow = PredictionLog(storage, self.tasks, root=SHADOW_ROOT)
        self.health: dict[str, VersionHealth] = {}
        self.driver = RolloutDriver(self.cfg, self.registry, self.feedback, self.shadow,
                                     lambda _: {"node-a": dict(self.health)})
        self.rng = random.Random(0)

    def _count(self, version: str) -> None:
        """One request in ``version``'s serving counters, as a replica's metrics count it."""
        h = self.health.get(version, VersionHealth())
        self.health[version] = VersionHealth(h.requests + 1, h.errors, h.latency_buckets)

    def served(self, version: str, right: bool, shadow_right: bool | None = None, shadow_version: str = "v2",
               key_id: str | None = None) -> str:
        """One prediction of ``version`` with feedback saying whether it was right (and the
        shadow's answer to the same request, when given); its id."""
        self._count(version)
        if shadow_right is not None:
            self._count("v2")  # a shadow run
        at = datetime.now(UTC)
        pid = new_prediction_id(at)
        truth = self.rng.choice(LABELS)
        wrong = LABELS[1 - LABELS.index(truth)]
        self.feedback.append(model="m", text="t", label=truth, prediction_id=pid, version=version,
                             predicted_label=truth if right else wrong, predicted_at=at, key_id=key_id)
        if shadow_right is not None:
            self.shadow.append("m", [{"prediction_id": pid, "model": "m", "version": shadow_version, "text": "t",
                                      "created_at": at, "label": truth if shadow_right else wrong,
                                      "scores": {truth: 0.9, wrong: 0.1}}])
        return pid


@pytest.fixture
def shadow_world(tmp_path):
    world = World(tmp_path, "shadow")
    world.registry.start_rollout("m", "v2", "shadow", 0)
    return world


def test_a_better_shadow_goes_to_canary_then_production_by_its_feedback(shadow_world):
    w = shadow_world
    assert w.driver.look("m").action == "hold"  # no feedback yet
    for i in range(80):  # production right 70%, the shadow 90%, on the same requests
        w.served("v1", right=i % 10 < 7, shadow_right=i % 10 < 9)
    w.feedback.compact()
    decision = w.driver.look("m")
    assert decision.action == "advance" and decision.numbers["pairs"] == 80
    state = w.registry.state("m")
    assert (state.rollout.stage, state.rollout.percent) == ("canary", 10.0)
    assert state.history[-1].numbers["challenger_only"] == 16
    assert len(w.driver._shadow_answers) == 80
    # Canary: only predictions since the step count; v2 now answers its own share.
    assert w.driver.look("m").action == "hold"
    assert not w.driver._shadow_answers  # the shadow's answers are let go with their stage
    for step in range(2):
        assert w.driver.look("m").action == "hold"  # the stage's first look: its health counts start here
        for i in range(70):
            w.served("v1", right=i % 10 < 7)
            w.served("v2", right=i % 10 < 9)
        w.feedback.compact()
        assert w.driver.look("m").action == "advance"
    state = w.registry.state("m")
    assert (state.production, state.rollout) == ("v2", None)
    assert [h.event for h in state.history][-4:] == ["rollout", "step", "step", "promote"]


def test_a_hold_is_recorded_for_status_once_until_what_it_says_changes(shadow_world):
    """A hold changes no state: an operator could not tell why a canary stayed where it was."""
    from tuneloop.control.cli import _describe_state

    w = shadow_world
    decision = w.driver.look("m")
    look = w.registry.rollout_look("m")
    rollout = w.registry.state("m").rollout
    assert (look["action"], look["reason"], look["version"]) == ("hold", decision.reason, "v2")
    writes = []
    record = w.registry.record_rollout_look
    w.registry.record_rollout_look = lambda model, doc: writes.append(doc) or record(model, doc)
    w.driver.look("m")
    assert writes == []  # the same hold: not written again
    lines = _describe_state("m", w.registry.state("m"), look)
    assert lines[1] == f"  last look {look['at']}: hold: {decision.reason}"
    stale = {**look, "stage_started_at": "2000-01-01T00:00:00+00:00"}  # a look at an earlier stage: not shown
    assert not any("last look" in line for line in _describe_state("m", w.registry.state("m"), stale))
    assert rollout.stage == "shadow"


def test_feedback_of_a_key_the_quarantine_holds_judges_no_rollout(shadow_world):
    """Held out of training, a key agreeing with the challenger and not with production
    promoted it all the same."""
    from tuneloop.store.quarantine import QuarantineBook

    w = shadow_world
    QuarantineBook(w.registry.storage).quarantine("m", {"bad00000": "disagrees with production"}, {})
    assert w.driver.look("m").action == "hold"  # the stage's first look: its health counts start here
    for i in range(80):
        w.served("v1", right=False, shadow_right=True, key_id="bad00000")
    w.feedback.compact()
    decision = w.driver.look("m")
    assert decision.action == "hold" and w.registry.state("m").rollout.stage == "shadow"
    for i in range(80):  # the same evidence from an honest key moves it
        w.served("v1", right=i % 10 < 7, shadow_right=i % 10 < 9, key_id="good0000")
    w.feedback.compact()
    assert w.driver.look("m").action == "advance"


def test_a_held_keys_answer_on_an_honest_keys_prediction_does_not_erase_it(shadow_world):
    """Taken out after the newest answer per prediction was chosen, a held key's later answer
    replaced the honest one and was then dropped: the prediction counted for nothing."""
    from tuneloop.store.quarantine import QuarantineBook

    w = shadow_world
    QuarantineBook(w.registry.storage).quarantine("m", {"bad00000": "disagrees with production"}, {})
    assert w.driver.look("m").action == "hold"
    pids = [w.served("v1", right=i % 10 < 7, shadow_right=i % 10 < 9, key_id="good0000") for i in range(80)]
    for pid in pids:  # the held key answers every one of them again, later
        w.feedback.append(model="m", text="t", label="positive", prediction_id=pid, version="v1",
                          predicted_label="negative", key_id="bad00000")
    w.feedback.compact()
    decision = w.driver.look("m")
    assert decision.action == "advance" and decision.numbers["pairs"] == 80


def test_a_quarantine_book_cut_mid_write_stops_no_rollout_decision(shadow_world, caplog):
    """Read raw, a cut book raised at every look: no decision was taken for the model, health
    rollbacks included, until someone repaired the file."""
    w = shadow_world
    (Path(w.registry.storage.root) / "registry/m/quarantine.json").write_text('{"bad00000": {"key_')
    for i in range(80):
        w.served("v1", right=i % 10 < 9, shadow_right=i % 10 < 5)
    w.feedback.compact()
    assert w.driver.look("m").action == "rollback"
    assert "quarantine.json" in caplog.text and "judging on every key's feedback" in caplog.text


def test_a_worse_shadow_is_rolled_back_by_itself(shadow_world):
    w = shadow_world
    for i in range(80):
        w.served("v1", right=i % 10 < 9, shadow_right=i % 10 < 5)
    w.feedback.compact()
    assert w.driver.look("m").action == "rollback"
    state = w.registry.state("m")
    assert (state.production, state.rollout, state.history[-1].event) == ("v1", None, "abort")
    assert state.history[-1].reason.startswith("automatic: worse")


def test_unhealthy_canary_rolls_back_on_counts_since_its_stage_began(tmp_path):
    w = World(tmp_path, "canary")
    w.registry.start_rollout("m", "v2", "canary", 10.0)
    # Failures before the stage began are the baseline, not the stage's.
    w.health = {"v1": VersionHealth(1000, 0), "v2": VersionHealth(100, 90)}
    assert w.driver.look("m").action == "hold"
    w.health = {"v1": VersionHealth(2000, 1), "v2": VersionHealth(130, 100)}  # +30 requests, +10 errors
    decision = w.driver.look("m")
    assert decision.action == "rollback" and "error rate 33.33%" in decision.reason
    assert w.registry.state("m").rollout is None


def test_a_paused_rollout_is_left_alone_and_an_overdue_one_alerts_once(tmp_path):
    w = World(tmp_path, "canary")
    w.registry.start_rollout("m", "v2", "canary", 10.0)
    w.registry.mark_rollout("m", "v2", "pause")
    assert w.driver.look("m") is None
    w.registry.mark_rollout("m", "v2", "resume")
    w.driver.clock = lambda: datetime.now(UTC) + timedelta(seconds=w.cfg.rollout.inconclusive_after_s + 1)
    assert w.driver.look("m").alert and w.registry.state("m").rollout.alerted
    w.driver.look("m")
    assert [h.event for h in w.registry.state("m").history].count("alert") == 1


@pytest.mark.parametrize("operator", ["pause", "step"])
def test_an_operators_pause_or_step_while_the_driver_judges_stands(tmp_path, operator):
    """The driver reads the state, then feedback and health (seconds, at scale), then acts:
    an operator acting in between wins, and the driver's decision on the old stage is dropped."""
    w = World(tmp_path, "canary")
    w.registry.start_rollout("m", "v2", "canary", 10.0)
    w.health = {"v1": VersionHealth(1000, 0), "v2": VersionHealth(100, 0)}
    assert w.driver.look("m").action == "hold"  # the stage's baseline counts

    def operator_acts_while_health_is_read(_model):
        if operator == "pause":
            w.registry.mark_rollout("m", "v2", "pause")
        else:
            w.registry.advance_rollout("m", "v2", w.cfg.rollout.canary_steps, "by hand")
        return {"node-a": {"v1": VersionHealth(2000, 1), "v2": VersionHealth(130, 30)}}  # +30 requests, +30 errors

    w.driver.health = operator_acts_while_health_is_read
    assert w.driver.look("m").action == "rollback"  # judged on the stage it read...
    state = w.registry.state("m")  # ...and not applied: the operator's change stands
    assert state.rollout is not None and state.rollout.version == "v2" and state.history[-1].event == operator
    assert state.rollout.paused if operator == "pause" else state.rollout.percent == 50


def test_only_the_challengers_shadow_answers_count_and_a_settled_miss_is_not_looked_up_again(shadow_world):
    """A replica that had not reloaded after an operator swapped the challenger logged the
    old one's answers, which counted as the new one's; and every look read the log again
    for each prediction whose shadow run was shed, a look growing with the stage."""
    w = shadow_world
    ours = [w.served("v1", right=True, shadow_right=True) for _ in range(3)]
    stale = [w.served("v1", right=True, shadow_right=False, shadow_version="v9") for _ in range(3)]
    shed = [w.served("v1", right=True) for _ in range(3)]
    rows = [{"prediction_id": p} for p in ours + stale + shed]
    assert set(w.driver._find_shadow_answers("m", "v2", rows)) == set(ours)
    lookups = []
    real = w.shadow.lookup
    w.shadow.lookup = lambda models, pid: lookups.append(pid) or real(models, pid)
    w.driver._find_shadow_answers("m", "v2", rows)
    assert sorted(lookups) == sorted(shed)  # young misses: their shadow may still be logged
    lookups.clear()
    w.driver.clock = lambda: datetime.now(UTC) + timedelta(minutes=5)
    w.driver._find_shadow_answers("m", "v2", rows)  # settled now: the last lookups of them
    w.driver._find_shadow_answers("m", "v2", rows)
    assert sorted(lookups) == sorted(shed)


def test_errors_right_after_an_advance_count_toward_the_next_stage(tmp_path):
    """The next stage counted from the driver's first look at it, evaluate_every_s after the
    advance: a canary failing as soon as it took 50% went on to production."""
    w = World(tmp_path, "canary")
    w.registry.start_rollout("m", "v2", "canary", 10.0)
    assert w.driver.look("m").action == "hold"  # the first stage's baseline
    for i in range(70):
        w.served("v1", right=i % 10 < 7)
        w.served("v2", right=i % 10 < 9)
    w.feedback.compact()
    assert w.driver.look("m").action == "advance" and w.registry.state("m").rollout.percent == 50.0
    h = w.health["v2"]
    w.health["v2"] = VersionHealth(h.requests + 30, h.errors + 20, h.latency_buckets)  # before the next look
    decision = w.driver.look("m")
    assert decision.action == "rollback" and "error rate 66.67%" in decision.reason


def test_a_look_without_every_nodes_counters_sets_no_baseline(tmp_path):
    """A scrape missing a node raises (serving/metric_files.IncompleteScrape) rather than
    return a partial reading: taken as the stage's baseline, that node's whole history of
    errors would count as the stage's once the node answered, and roll a healthy canary back."""
    w = World(tmp_path, "canary")
    w.registry.start_rollout("m", "v2", "canary", 10.0)

    def partial(_model):
        raise RuntimeError("1 of 2 nodes did not send their replicas' metrics")

    w.driver.health = partial
    assert w.driver.look("m").action == "hold"  # judged on feedback alone: none yet
    w.driver.health = lambda _: {"node-a": dict(w.health)}
    w.health = {"v1": VersionHealth(1000, 0), "v2": VersionHealth(100, 90)}  # the node's history, errors and all
    assert w.driver.look("m").action == "hold"  # the first whole reading is the baseline
    w.health = {"v1": VersionHealth(2000, 0), "v2": VersionHealth(130, 90)}  # +30 requests, no new errors
    assert w.driver.look("m").action == "hold"
    assert w.registry.state("m").rollout is not None


def test_a_node_leaving_takes_its_history_not_the_stages_errors(tmp_path):
    """Summed over nodes first, a spot node that left with 20 errors before the stage made
    the stage's next 10 errors read as -10: a negative error rate, and no rollback."""
    w = World(tmp_path, "canary")
    w.registry.start_rollout("m", "v2", "canary", 10.0)
    nodes = {"a": {"v2": VersionHealth(40, 20)}, "b": {"v2": VersionHealth(10, 0)}}
    w.driver.health = lambda _: {n: dict(v) for n, v in nodes.items()}
    assert w.driver.look("m").action == "hold"  # the baseline: both nodes
    del nodes["a"]  # node a left; node b serves the stage, and fails
    nodes["b"] = {"v2": VersionHealth(40, 10)}
    nodes["c"] = {"v2": VersionHealth(30, 0)}  # new since the baseline: counts from 0
    decision = w.driver.look("m")
    assert decision.action == "rollback" and "error rate 16.67%" in decision.reason  # 10 of 60

"""The retrain controller's decisions with a fake launch in place of Ray tasks, over real
job records on disk: when a job starts, that one runs per model, that a crashed job is
marked failed, that a job started elsewhere counts. Milliseconds, no Ray."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from tuneloop.control.controller import LAUNCH_RETRY_S, STATE_REFRESH_S, Retrainer
from tuneloop.core.config import parse_config
from tuneloop.core.evaluation import EvalMetrics
from tuneloop.store.jobs import JobStore
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage


class FakeLaunch:
    """Records each launch and hands back a Future the test settles, as a Ray task's."""

    def __init__(self, jobs: JobStore):
        self.jobs = jobs
        self.launched: list[tuple[str, str, object]] = []
        self.futures: list[Future] = []

    def __call__(self, model, trigger, job):
        self.launched.append((model, trigger, job))
        self.futures.append(Future())
        return self.futures[-1]

    def finish(self, i: int, state: str = "succeeded") -> None:
        job = self.launched[i][2]
        job.state, job.finished_at = state, self.jobs.now()
        self.jobs.save(job)  # what run_training writes last
        self.futures[i].set_result(state)


def _retrainer(tmp_path, every_n=3, pending=None, clock=None):
    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["a", "b"]},
                                   {"name": "n", "base_model": "x", "labels": ["a", "b"]}],
                        "trigger": {"every_n_feedback": every_n}, "storage": {"root": str(tmp_path)}})
    storage = Storage(str(tmp_path))
    jobs = JobStore(storage)
    launch = FakeLaunch(jobs)
    return Retrainer(cfg, jobs, Registry(storage), launch, pending or {"m": 0, "n": 0}, sweep_every_s=None,
                     **({"clock": clock} if clock else {})), launch, jobs


def test_every_nth_feedback_starts_one_job_and_the_count_restarts(tmp_path):
    retrainer, launch, jobs = _retrainer(tmp_path, every_n=3)
    assert [retrainer.record_feedback("m") for _ in range(2)] == [None, None]
    job_id = retrainer.record_feedback("m")
    assert job_id is not None and [(m, t) for m, t, _ in launch.launched] == [("m", "feedback")]
    status = retrainer.status()
    assert jobs.get(job_id).state == "running"
    assert (status["pending"], status["running"]) == ({"m": 0, "n": 0}, ["m"])
    # While it runs, more feedback is counted towards the next job but starts none.
    assert [retrainer.record_feedback("m") for _ in range(5)] == [None] * 5
    assert retrainer.start("m") is None  # the API answers 409
    assert retrainer.start("n") is not None  # another model is not held up
    launch.finish(0)
    assert retrainer.record_feedback("m") is not None  # 6 pending >= 3, and nothing running
    assert len(launch.launched) == 3


def test_answers_on_one_prediction_count_once_until_a_job_starts(tmp_path):
    retrainer, launch, _ = _retrainer(tmp_path, every_n=3, pending={"m": 1, "n": 0})
    retrainer.counted["m"] = {"p0"}  # as parts_from_config finds it in the files
    for _ in range(4):  # a user relabelling the same predictions: one row each to train
        assert retrainer.record_feedback("m", "v1", False, "p0") is None
        assert retrainer.record_feedback("m", "v1", False, "p1") is None
    assert retrainer.status()["pending"]["m"] == 2 and launch.launched == []
    assert retrainer.record_feedback("m", None, None, None) is not None  # a text: a new row
    assert retrainer.record_feedback("m", "v1", True, "p0") is None  # after the job started: counts again
    assert retrainer.status()["pending"]["m"] == 1


def test_feedback_left_over_from_before_a_restart_counts(tmp_path):
    retrainer, launch, _ = _retrainer(tmp_path, every_n=10, pending={"m": 9, "n": 0})
    assert retrainer.record_feedback("m") is not None


def test_manual_trigger_never_starts_on_feedback(tmp_path):
    retrainer, launch, _ = _retrainer(tmp_path, every_n=0)
    assert all(retrainer.record_feedback("m") is None for _ in range(50)) and launch.launched == []
    assert retrainer.start("m", "manual (key 0a1b2c3d)") is not None


def test_a_job_whose_task_crashed_is_marked_failed_and_frees_the_model(tmp_path):
    retrainer, launch, jobs = _retrainer(tmp_path)
    job_id = retrainer.start("m")
    launch.futures[0].set_exception(RuntimeError("worker died"))
    assert retrainer.status()["running"] == []
    job = jobs.get(job_id)
    assert job.state == "failed" and job.error == "lost: the job's process died (RuntimeError)"
    assert retrainer.start("m") is not None


def test_a_job_started_elsewhere_holds_the_model_until_it_ends(tmp_path):
    retrainer, launch, jobs = _retrainer(tmp_path)
    other = jobs.create("m", "manual")  # `tuneloop train` beside the server
    assert retrainer.start("m") is None and launch.launched == []
    other.state = "succeeded"
    jobs.save(other)
    assert retrainer.start("m") is not None


def test_a_restarted_controller_knows_the_running_jobs_from_their_records(tmp_path):
    first, _, jobs = _retrainer(tmp_path)
    first.start("m")
    second = Retrainer(first.cfg, jobs, first.registry, lambda *a: Future(), {"m": 0, "n": 0}, sweep_every_s=None)
    assert second.status()["running"] == ["m"] and second.start("m") is None


def test_the_accuracy_drop_trigger_counts_feedback_on_productions_predictions_only(tmp_path):
    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["a", "b"]}],
                        "trigger": {"accuracy_drop": 0.1, "accuracy_window": 4}, "storage": {"root": str(tmp_path)}})
    storage = Storage(str(tmp_path))
    registry, jobs = Registry(storage), JobStore(storage)
    weights = tmp_path / "w"
    weights.mkdir()
    golden = EvalMetrics(accuracy=0.9, precision=0.9, recall=0.9, f1=0.9, eval_rows=100)
    v1 = registry.publish("m", str(weights), Manifest(version="pending", model="m", parent=None, base_model="x",
                                                      task="text-classification", labels=["a", "b"], metrics=golden))
    registry.promote("m", v1.version, reason="test")
    launch = FakeLaunch(jobs)
    retrainer = Retrainer(cfg, jobs, registry, launch, {"m": 0}, sweep_every_s=None)
    for agreed in (False, False, False, False):
        retrainer.record_feedback("m", "v0", agreed)  # an older version's predictions: not production's
    retrainer.record_feedback("m", None, None)  # feedback given as a text
    assert launch.launched == []
    results = [retrainer.record_feedback("m", "v1", agreed) for agreed in (True, True, True, False)]
    assert results[:3] == [None] * 3 and results[3] is not None  # 75% agreed, golden 90%: a drop of 15 points
    assert [t for _, t, _ in launch.launched] == ["accuracy_drop"]
    assert retrainer.status()["online_accuracy"] == {"m": 0.75}
    # The gate rejects the job: production stays, and so does the window that fired. It fires
    # again only on a full window judged since (it had fired at every record, job after job).
    launch.finish(0, "rejected")
    results = [retrainer.record_feedback("m", "v1", agreed) for agreed in (False, False, False, False)]
    assert results[:3] == [None] * 3 and results[3] is not None
    assert [t for _, t, _ in launch.launched] == ["accuracy_drop"] * 2


def test_a_restart_keeps_the_accuracy_drop_window_of_productions_judged_predictions(tmp_path):
    """A restart (any config change restarts the controller) emptied the window: the trigger
    waited for a whole window of new answers, and answers judged before were judged again."""
    from tuneloop.core.tasks import model_tasks
    from tuneloop.store.quarantine import QuarantineBook
    from tuneloop.store.feedback_store import FeedbackStore

    _, _, registry = _accuracy_drop_world(tmp_path)  # v1 in production, golden accuracy 0.9, a window of 4
    config = {"models": [{"name": "m", "base_model": "x", "labels": ["a", "b"]}],
              "trigger": {"accuracy_drop": 0.1, "accuracy_window": 4}, "storage": {"root": str(tmp_path)}}
    cfg = parse_config(config)
    feedback = FeedbackStore(registry.storage, str(tmp_path / "journal"), model_tasks(cfg.models))
    feedback.open_writer()

    def answer(pid, label, key=None, version="v1"):
        feedback.append(model="m", text=f"text of {pid}", label=label, prediction_id=pid, version=version,
                        predicted_label="a", key_id=key)

    answer("p0", "a")
    answer("p1", "a")
    answer("p2", "b")  # wrong
    answer("p0", "b")  # a second answer on p0: judged on its first
    answer("p3", "b", key="bad00000")  # a key the quarantine holds
    answer("p4", "b", version="v0")  # an older version's prediction
    feedback.close()
    QuarantineBook(registry.storage).quarantine("m", {"bad00000": "flipped"}, {})
    parts = Retrainer.parts_from_config(cfg.model_dump())
    assert parts["judged"] == {"m": ("v1", [("p0", True), ("p1", True), ("p2", False)], 3)}
    jobs = parts["jobs"]
    launch = FakeLaunch(jobs)
    retrainer = Retrainer(**{**parts, "launch": launch}, sweep_every_s=None)
    assert retrainer.record_feedback("m", "v1", False, "p1") is None  # judged before the restart: not again
    assert retrainer.record_feedback("m", "v1", True, "p5") is not None  # 3 of 4 agreed, golden 0.9: the drop
    assert [t for _, t, _ in launch.launched] == ["accuracy_drop"]


def _accuracy_drop_world(tmp_path):
    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["a", "b"]}],
                        "trigger": {"accuracy_drop": 0.1, "accuracy_window": 4, "every_n_feedback": 5},
                        "storage": {"root": str(tmp_path)}})
    storage = Storage(str(tmp_path))
    registry, jobs = Registry(storage), JobStore(storage)
    (tmp_path / "w").mkdir()
    golden = EvalMetrics(accuracy=0.9, precision=0.9, recall=0.9, f1=0.9, eval_rows=100)
    registry.publish("m", str(tmp_path / "w"), Manifest(version="pending", model="m", parent=None, base_model="x",
                                                        task="text-classification", labels=["a", "b"],
                                                        metrics=golden))
    registry.promote("m", "v1", reason="test")
    launch = FakeLaunch(jobs)
    return Retrainer(cfg, jobs, registry, launch, {"m": 0}, sweep_every_s=None), launch, registry


def test_one_client_re_answering_one_prediction_starts_no_job(tmp_path):
    """200 disagreements on one prediction filled the agreement window and started an
    accuracy-drop job; after it, 200 more started the next, without end."""
    retrainer, launch, _ = _accuracy_drop_world(tmp_path)
    assert all(retrainer.record_feedback("m", "v1", False, "p0", "k1") is None for _ in range(200))
    assert launch.launched == []
    results = [retrainer.record_feedback("m", "v1", False, f"p{i}", "k1") for i in range(1, 4)]
    assert results[:2] == [None, None] and results[2] is not None  # four predictions judged: the window fires
    assert [t for _, t, _ in launch.launched] == ["accuracy_drop"]
    launch.finish(0, "rejected")
    assert all(retrainer.record_feedback("m", "v1", False, f"p{i % 4}", "k1") is None for i in range(200))
    assert len(launch.launched) == 1  # the same four predictions again, after the job: no second job
    # Cycling through one id more than the window (4) judged each answer anew. (Five distinct
    # predictions answered since the job do make every_n_feedback's count, 5 here.)
    finished = len(launch.launched)
    for i in range(200):
        retrainer.record_feedback("m", "v1", False, f"p{i % 5}", "k1")
        for j in range(finished, len(launch.launched)):
            launch.finish(j, "rejected")
        finished = len(launch.launched)
    assert [t for _, t, _ in launch.launched].count("accuracy_drop") == 1


def test_feedback_of_a_key_the_quarantine_holds_starts_no_job(tmp_path):
    from tuneloop.store.quarantine import QuarantineBook

    retrainer, launch, registry = _accuracy_drop_world(tmp_path)
    QuarantineBook(registry.storage).quarantine("m", {"bad00000": "flipped every label"}, {})
    assert all(retrainer.record_feedback("m", "v1", False, f"p{i}", "bad00000") is None for i in range(50))
    assert launch.launched == [] and retrainer.pending["m"] == 0
    assert retrainer.record_feedback("m", None, None, None, None) is None  # keyless: counts (1 of 5)
    assert retrainer.pending["m"] == 1


def test_a_job_that_fails_for_good_is_not_restarted_until_new_feedback_is_due(tmp_path):
    retrainer, launch, jobs = _retrainer(tmp_path, every_n=3)
    for _ in range(3):
        retrainer.record_feedback("m")
    launch.finish(0, "failed")  # e.g. too few rows for its workers: the next try fails too
    with retrainer._lock:  # what the sweeper does every 10 s
        retrainer._reap()
        assert retrainer._maybe_start("m") is None
    assert len(launch.launched) == 1 and retrainer.status()["pending"]["m"] == 0
    assert [retrainer.record_feedback("m") is not None for _ in range(3)] == [False, False, True]


def test_the_schedule_fires_from_the_sweeper_when_there_is_new_feedback(tmp_path):
    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["a", "b"]}],
                        "trigger": {"interval_s": 60}, "storage": {"root": str(tmp_path)}})
    storage = Storage(str(tmp_path))
    jobs, now = JobStore(storage), [1000.0]
    launch = FakeLaunch(jobs)
    retrainer = Retrainer(cfg, jobs, Registry(storage), launch, {"m": 0}, clock=lambda: now[0], sweep_every_s=None)
    with retrainer._lock:
        assert retrainer._maybe_start("m") is None  # nothing new
    assert retrainer.record_feedback("m") is not None  # never trained by a job: the schedule is due
    launch.finish(0)
    retrainer.record_feedback("m")
    now[0] += 30
    with retrainer._lock:
        assert retrainer._maybe_start("m") is None  # 30 s of 60
    now[0] += 31
    with retrainer._lock:
        assert retrainer._maybe_start("m") is not None
    assert [t for _, t, _ in launch.launched] == ["schedule", "schedule"]


def test_a_launch_that_never_ran_does_not_hold_the_schedule_back_after_a_restart(tmp_path):
    """A refused launch leaves a failed record with no heartbeat; a controller started after
    it took it for the newest job and waited a whole interval_s after a job that trained on
    nothing."""
    from datetime import UTC, datetime

    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["a", "b"]}],
                        "trigger": {"interval_s": 3600}, "storage": {"root": str(tmp_path)}})
    storage = Storage(str(tmp_path))
    jobs = JobStore(storage)
    refused = jobs.create("m", "schedule")
    refused.state, refused.finished_at = "failed", jobs.now()
    jobs.save(refused)
    now = datetime.fromisoformat(refused.created_at).astimezone(UTC).timestamp() + 120
    retrainer = Retrainer(cfg, jobs, Registry(storage), FakeLaunch(jobs), {"m": 5}, clock=lambda: now,
                          sweep_every_s=None)
    with retrainer._lock:
        assert retrainer._maybe_start("m") is not None  # due: no job ever ran


def test_a_retiring_controller_starts_no_job_and_is_busy_until_its_own_ends(tmp_path):
    """Handing over to a new config's controller (control/apps.py): the old one finishes
    its job and starts no other; the successor sees that job and starts none beside it."""
    retrainer, launch, jobs = _retrainer(tmp_path, every_n=1)
    assert retrainer.record_feedback("m") is not None and retrainer.busy()
    retrainer.retiring = True
    launch.finish(0)
    assert not retrainer.busy()
    assert retrainer.record_feedback("m") is None and retrainer.start("n") is None
    assert len(launch.launched) == 1
    # What lets the ingress answer a manual retrain 503 "handing over", not 409 "running".
    assert retrainer.status()["retiring"] and "n" not in retrainer.status()["running"]


def test_a_new_controller_waits_for_the_job_of_the_one_it_replaces(tmp_path):
    now = [1000.0]
    old, launch, jobs = _retrainer(tmp_path, every_n=1, clock=lambda: now[0])
    assert old.record_feedback("m") is not None
    new, new_launch, _ = _retrainer(tmp_path, every_n=1, clock=lambda: now[0])
    assert new.record_feedback("m") is None and not new_launch.launched  # the old one's job runs
    launch.finish(0)
    reads = []
    real_get = new.jobs.get
    new.jobs.get = lambda job_id: reads.append(job_id) or real_get(job_id)
    assert new.record_feedback("m") is None and reads == []  # its record is read at most once a second
    now[0] += STATE_REFRESH_S
    assert new.record_feedback("m") is not None and len(reads) == 1


def test_a_student_follows_its_teachers_production_once_per_version(tmp_path):
    cfg = parse_config({"models": [{"name": "big", "base_model": "x", "labels": ["a", "b"]},
                                   {"name": "small", "labels": ["a", "b"],
                                    "distill": {"teacher": "big", "student_layers": 1}}],
                        "storage": {"root": str(tmp_path)}})
    storage = Storage(str(tmp_path))
    jobs, registry = JobStore(storage), Registry(storage)
    launch = FakeLaunch(jobs)
    retrainer = Retrainer(cfg, jobs, registry, launch, {"big": 0, "small": 0}, sweep_every_s=None)

    def sweep():
        with retrainer._lock:
            retrainer._reap()
            retrainer._follow_teachers()
        return [(m, t) for m, t, _ in launch.launched]

    def publish(model, distilled_from=None):
        weights = tmp_path / f"w-{model}-{len(registry.versions(model))}"
        weights.mkdir()
        m = registry.publish(model, str(weights), Manifest(version="pending", model=model, parent=None, base_model="x",
                                                           task="text-classification", labels=["a", "b"],
                                                           distilled_from=distilled_from))
        registry.promote(model, m.version, reason="test")
        return m.version

    assert sweep() == []  # the teacher has no production: nothing to learn from
    publish("big")
    assert sweep() == [("small", "teacher big v1")]
    launch.finish(0, "rejected")  # the gate said no: not tried again for v1
    assert sweep() == [("small", "teacher big v1")]
    publish("big")  # however v2 became production (a job, a rollout, an operator)
    assert sweep()[1:] == [("small", "teacher big v2")]
    launch.finish(1)
    publish("small", {"model": "big", "version": "v2"})
    # A restarted controller reads what the student's production learned from.
    again = Retrainer(cfg, jobs, registry, launch, {"big": 0, "small": 0}, sweep_every_s=None)
    with again._lock:
        again._follow_teachers()
    assert len(launch.launched) == 2
    # While the student rolls out a version of its own, a new teacher version waits: its job's
    # version could only wait as a candidate, and the teacher version would count as followed.
    publish("small", {"model": "big", "version": "v2"})
    registry.promote("small", "v1", reason="test")
    registry.start_rollout("small", "v2", "shadow", 0)
    publish("big")
    retrainer._state_read_at.clear()
    assert len(sweep()) == 2
    registry.abort_rollout("small", "v2", "test")
    retrainer._state_read_at.clear()
    assert sweep()[2:] == [("small", "teacher big v3")]


def test_no_automatic_job_starts_while_a_challenger_is_rolled_out(tmp_path):
    """Its version could start no rollout of its own (a 409): it would wait as a candidate."""
    now = [1000.0]
    retrainer, launch, _ = _retrainer(tmp_path, every_n=2, clock=lambda: now[0])
    registry = retrainer.registry
    weights = tmp_path / "w"
    weights.mkdir()
    for parent in (None, "v1"):
        registry.publish("m", str(weights), Manifest(version="pending", model="m", parent=parent, base_model="x",
                                                     task="text-classification", labels=["a", "b"]))
    registry.promote("m", "v1")
    registry.start_rollout("m", "v2", "shadow", 0)
    assert [retrainer.record_feedback("m") for _ in range(4)] == [None] * 4 and launch.launched == []
    assert retrainer.start("m") is not None  # an operator still may
    launch.finish(0)
    registry.rollback("m")  # the rollout ends: feedback starts jobs again, once the state is read again
    assert retrainer.record_feedback("m") is None
    now[0] += STATE_REFRESH_S
    assert retrainer.record_feedback("m") is not None


def test_no_second_job_starts_on_a_cached_state_when_the_first_hands_its_version_to_a_rollout(tmp_path):
    """The job writes the rollout a moment before its task returns: the state cached up to a
    second earlier said no rollout, and the count a job's run filled started a second job."""
    now = [1000.0]
    retrainer, launch, _ = _retrainer(tmp_path, every_n=2, clock=lambda: now[0])
    registry, weights = retrainer.registry, tmp_path / "w"
    weights.mkdir()
    for parent in (None, "v1"):
        registry.publish("m", str(weights), Manifest(version="pending", model="m", parent=parent, base_model="x",
                                                     task="text-classification", labels=["a", "b"]))
    registry.promote("m", "v1")
    assert [retrainer.record_feedback("m") is not None for _ in range(2)] == [False, True]  # job A
    assert [retrainer.record_feedback("m") for _ in range(2)] == [None, None]  # counted while A runs
    registry.start_rollout("m", "v2", "shadow", 0)  # A's hand-over, then its task returns
    launch.finish(0)
    assert retrainer.record_feedback("m") is None and len(launch.launched) == 1  # same second: read anew


def test_a_job_started_elsewhere_resets_the_counts_it_trained_on(tmp_path):
    """A `tuneloop train` beside the server trained on what the triggers counted; once it
    ended, the counts of before it started another job within a sweep."""
    retrainer, launch, jobs = _retrainer(tmp_path, every_n=5)
    assert [retrainer.record_feedback("m") for _ in range(4)] == [None] * 4
    refused = jobs.create("m", "manual")  # one refused the model's lease: it never ran, trained on nothing
    refused.state, refused.finished_at = "failed", jobs.now()
    jobs.save(refused)
    retrainer.sweep()
    assert retrainer.pending["m"] == 4
    elsewhere = jobs.create("m", "manual")  # the operator's job reads those four
    retrainer.sweep()
    assert retrainer.pending["m"] == 0 and retrainer.running["m"] == elsewhere.job_id
    elsewhere.state, elsewhere.finished_at = "succeeded", jobs.now()
    jobs.save(elsewhere)
    retrainer.sweep()
    assert retrainer.record_feedback("m") is None and launch.launched == []  # 1 of 5, not 5
    assert [retrainer.record_feedback("m") for _ in range(4)][-1] is not None  # the fifth after it


def test_a_job_that_cannot_be_launched_leaves_no_running_record_and_keeps_the_count(tmp_path):
    """Its record, written first, stayed "running" with no process until marked lost."""
    now = [1000.0]
    retrainer, launch, jobs = _retrainer(tmp_path, every_n=2, clock=lambda: now[0])

    def refuse(model, trigger, job):
        raise RuntimeError("the cluster refused the task")

    retrainer._launch = refuse
    retrainer.record_feedback("m")
    with pytest.raises(RuntimeError, match="refused"):
        retrainer.record_feedback("m")
    retrainer.sweep()  # its own failed record is no job started elsewhere
    [record] = jobs.all()
    assert record.state == "failed" and record.error == "could not start: RuntimeError: the cluster refused the task"
    assert retrainer.pending["m"] == 2 and "m" not in retrainer.running
    retrainer._launch = launch
    assert retrainer.record_feedback("m") is None and len(jobs.all()) == 1  # not retried at every record
    now[0] += LAUNCH_RETRY_S
    assert retrainer.record_feedback("m") is not None  # the count stood: the next try fires


class CountingRegistry(Registry):
    def __init__(self, storage):
        super().__init__(storage)
        self.state_reads = 0

    def state(self, model):
        self.state_reads += 1
        return super().state(model)


def test_a_burst_of_feedback_reads_the_registry_state_once_a_refresh_period(tmp_path):
    """A record a call: reading the state for each held the lock for an object-store GET."""
    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["a", "b"]}],
                        "trigger": {"every_n_feedback": 10_000}, "storage": {"root": str(tmp_path)}})
    storage = Storage(str(tmp_path))
    jobs, registry, now = JobStore(storage), CountingRegistry(storage), [1000.0]
    retrainer = Retrainer(cfg, jobs, registry, FakeLaunch(jobs), {"m": 0}, clock=lambda: now[0], sweep_every_s=None)
    for i in range(500):
        retrainer.record_feedback("m", "v1", True, f"p{i}")
        now[0] += 0.01  # 100 records a second for 5 s
    assert registry.state_reads == 5
    assert retrainer.pending["m"] == 500


def test_after_a_restart_feedback_a_failed_job_had_does_not_start_a_job_again(tmp_path):
    from tuneloop.core.tasks import model_tasks
    from tuneloop.store.feedback_store import FeedbackStore

    config = {"models": [{"name": "m", "base_model": "x", "labels": ["a", "b"]}],
              "trigger": {"every_n_feedback": 3}, "storage": {"root": str(tmp_path)}}
    cfg = parse_config(config)
    storage = Storage(str(tmp_path))
    feedback = FeedbackStore(storage, str(tmp_path / "journal"), model_tasks(cfg.models))
    feedback.open_writer()
    for i in range(5):
        feedback.append(model="m", text=f"t{i}", label="a")
    feedback.compact()
    jobs = JobStore(storage)
    job = jobs.create("m", "feedback")
    job.state, job.heartbeat_at = "failed", job.created_at  # it ran, and failed
    jobs.save(job)
    for i in range(2):
        feedback.append(model="m", text=f"later {i}", label="a")
    for label in ("a", "b", "a"):  # three answers on one prediction: one row to train
        feedback.append(model="m", text="relabelled", label=label, prediction_id="f" * 32, version="v1",
                        predicted_label="a")
    never_ran = jobs.create("m", "feedback")  # a launch the cluster refused: it trained on nothing
    never_ran.state = "failed"
    jobs.save(never_ran)
    feedback.close()
    parts = Retrainer.parts_from_config(cfg.model_dump())
    assert parts["pending"] == {"m": 3} and parts["counted"] == {"m": {"f" * 32}}


def test_one_models_unreadable_state_at_a_restart_leaves_the_others_counting(tmp_path):
    """A cut state.json of one model made the controller's start raise: every model's
    triggers stopped, and the keeper restarted it in a loop."""
    from tuneloop.core.tasks import model_tasks
    from tuneloop.store.feedback_store import FeedbackStore

    cfg = parse_config({"models": [{"name": name, "base_model": "x", "labels": ["a", "b"]} for name in ("m", "cut")],
                        "trigger": {"every_n_feedback": 3, "accuracy_drop": 0.1}, "storage": {"root": str(tmp_path)}})
    storage = Storage(str(tmp_path))
    feedback = FeedbackStore(storage, str(tmp_path / "journal"), model_tasks(cfg.models))
    feedback.open_writer()
    for model in ("m", "cut"):
        feedback.append(model=model, text="a text", label="a")
    feedback.close()
    (tmp_path / "registry" / "cut").mkdir(parents=True)
    (tmp_path / "registry" / "cut" / "state.json").write_text('{"production": "v1", "gener')
    parts = Retrainer.parts_from_config(cfg.model_dump())
    assert parts["pending"] == {"m": 1, "cut": 0} and parts["judged"] == {"m": (None, [], 0)}


def test_a_job_record_cut_while_it_runs_leaves_the_controller_answering(tmp_path):
    """Its record read raised CorruptStoredFile out of every feedback call, status and sweep."""
    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["a", "b"]}],
                        "trigger": {"every_n_feedback": 100}, "storage": {"root": str(tmp_path)}})
    storage = Storage(str(tmp_path))
    jobs = JobStore(storage)
    other = jobs.create("m", "manual")  # a `tuneloop train` beside the server
    retrainer = Retrainer(cfg, jobs, Registry(storage), FakeLaunch(jobs), {"m": 0}, sweep_every_s=None)
    retrainer.sweep()
    assert retrainer.status()["running"] == ["m"]
    (tmp_path / "jobs" / f"{other.job_id}.json").write_text("{cut")
    assert retrainer.record_feedback("m") is None
    assert retrainer.status()["running"] == []


def test_after_a_restart_feedback_of_a_key_the_quarantine_holds_counts_toward_no_trigger(tmp_path):
    """A running controller skipped a held key's records, but its restart recounted them, and
    a flagged flood started a job at every restart (any config change restarts it)."""
    from tuneloop.core.tasks import model_tasks
    from tuneloop.store.quarantine import QuarantineBook
    from tuneloop.store.feedback_store import FeedbackStore

    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["a", "b"]}],
                        "trigger": {"every_n_feedback": 3}, "storage": {"root": str(tmp_path)}})
    storage = Storage(str(tmp_path))
    feedback = FeedbackStore(storage, str(tmp_path / "journal"), model_tasks(cfg.models))
    feedback.open_writer()
    for i in range(40):
        feedback.append(model="m", text=f"flood {i}", label="a", key_id="bad00000")
    feedback.append(model="m", text="honest", label="b", key_id="good0000")
    feedback.append(model="m", text="open", label="b")
    feedback.close()
    QuarantineBook(storage).quarantine("m", {"bad00000": "flipped every label"}, {})
    assert Retrainer.parts_from_config(cfg.model_dump())["pending"] == {"m": 2}


def test_an_accuracy_window_that_cannot_be_rebuilt_keeps_the_feedback_count_read_before_it(tmp_path, monkeypatch):
    """One try held both reads: a stored row the task could not judge wiped the count, and
    every_n_feedback waited for as many records again."""
    from tuneloop.core.tasks import model_tasks
    from tuneloop.store.feedback_store import FeedbackStore

    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["a", "b"]}],
                        "trigger": {"every_n_feedback": 5, "accuracy_drop": 0.1}, "storage": {"root": str(tmp_path)}})
    feedback = FeedbackStore(Storage(str(tmp_path)), str(tmp_path / "journal"), model_tasks(cfg.models))
    feedback.open_writer()
    for i in range(3):
        feedback.append(model="m", text=f"t{i}", label="a")
    feedback.close()

    def cannot_judge(*args):
        raise KeyError("predicted_label")

    monkeypatch.setattr(Retrainer, "_judged_feedback", cannot_judge)
    parts = Retrainer.parts_from_config(cfg.model_dump())
    assert parts["pending"] == {"m": 3} and parts["judged"] == {}


def test_a_student_job_for_any_reason_counts_as_learning_from_the_teachers_production(tmp_path):
    """Its job distils from the teacher's production then: a 'teacher' job after it would
    repeat it. And after a restart, a version the gate rejected is not retried for the same
    teacher version."""
    cfg = parse_config({"models": [{"name": "big", "base_model": "x", "labels": ["a", "b"]},
                                   {"name": "small", "labels": ["a", "b"],
                                    "distill": {"teacher": "big", "student_layers": 1}}],
                        "trigger": {"every_n_feedback": 1}, "storage": {"root": str(tmp_path)}})
    storage = Storage(str(tmp_path))
    jobs, registry = JobStore(storage), Registry(storage)
    launch = FakeLaunch(jobs)
    weights = tmp_path / "w"
    weights.mkdir()
    for model, distilled_from in (("big", None), ("small", {"model": "big", "version": "v1"})):
        registry.publish(model, str(weights), Manifest(version="pending", model=model, parent=None, base_model="x",
                                                       task="text-classification", labels=["a", "b"],
                                                       distilled_from=distilled_from))
    registry.promote("big", "v1")  # the student's v1: published, rejected by its gate, never production
    retrainer = Retrainer(cfg, jobs, registry, launch, {"big": 0, "small": 0}, sweep_every_s=None)
    with retrainer._lock:
        retrainer._follow_teachers()
    assert launch.launched == []  # restarted: v1 of the teacher was tried already
    registry.publish("big", str(weights), Manifest(version="pending", model="big", parent="v1", base_model="x",
                                                   task="text-classification", labels=["a", "b"]))
    registry.promote("big", "v2")
    assert retrainer.record_feedback("small") is not None  # a feedback job, distilling from v2
    launch.finish(0)
    with retrainer._lock:
        retrainer._follow_teachers()
    assert [(m, t) for m, t, _ in launch.launched] == [("small", "feedback")]


def test_prediction_logs_of_a_model_taken_out_of_the_config_are_held_to_retention(tmp_path):
    """Each replica prunes its own model's log; a model no replica serves any more kept
    every day of its log for good."""
    from datetime import UTC, datetime, timedelta

    from tuneloop.core.tasks import make_task
    from tuneloop.store.records import SHADOW_ROOT, PredictionLog, new_prediction_id

    now = datetime(2026, 12, 4, 12, tzinfo=UTC)
    retrainer, _, _ = _retrainer(tmp_path, clock=lambda: now.timestamp())
    storage = retrainer.registry.storage
    task = make_task("text-classification", ["a", "b"])
    for root in ("predictions", SHADOW_ROOT):
        log = PredictionLog(storage, {"gone": task, "m": task}, root=root)
        for model in ("gone", "m"):
            for age in (40, 1):
                at = now - timedelta(days=age)
                log.append(model, [{"prediction_id": new_prediction_id(at), "model": model, "version": "v1",
                                    "text": "t", "label": "a", "score": 1.0, "scores": {"a": 1.0}, "created_at": at}])
    dropped = retrainer.prune_removed_models()  # retention_days: 30 by default
    old_day = f"date={(now - timedelta(days=40)).date().isoformat()}"
    assert sorted(dropped) == [f"predictions/gone/{old_day}", f"{SHADOW_ROOT}/gone/{old_day}"]
    for root in ("predictions", SHADOW_ROOT):
        assert len(storage.list_dir(f"{root}/gone")) == 1  # the recent day stays
        assert len(storage.list_dir(f"{root}/m")) == 2  # a configured model's: its replicas' job

import multiprocessing
import os
import signal
from datetime import UTC, datetime, timedelta

import pytest

from tuneloop.core.errors import Conflict
from tuneloop.core.rollout import RolloutConfig
from tuneloop.store.jobs import Heartbeat, JobRecord, JobRunning, JobStore, hand_over, promote_or_wait, take_lease
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self):
        self.t = T0

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def storage(tmp_path):
    return Storage(str(tmp_path / "store"))


@pytest.fixture
def jobs(storage, clock):
    return JobStore(storage, clock=clock)


def _on_disk(storage: Storage, job_id: str) -> dict:
    return storage.read_json(f"jobs/{job_id}.json")


# -- staleness ---------------------------------------------------------------------------
def test_a_running_job_without_heartbeat_goes_stale_a_minute_after_creation(jobs, storage, clock):
    job = jobs.create("m", "manual")
    clock.advance(60)
    assert jobs.get(job.job_id).state == "running"  # exactly 60 s: not yet
    clock.advance(0.5)
    lost = jobs.get(job.job_id)
    assert lost.state == "failed" and lost.finished_at == clock().isoformat(timespec="milliseconds")
    assert lost.error == (f"lost: no heartbeat since it was created at {job.created_at} "
                          "(the job's process died or never started)")
    assert _on_disk(storage, job.job_id)["state"] == "failed"  # persisted, not just reported


def test_heartbeats_keep_a_job_alive_and_the_last_one_is_named(jobs, clock):
    job = jobs.create("m", "manual")
    heartbeat = Heartbeat(jobs, job)
    clock.advance(50)
    heartbeat.beat()
    beat_at = job.heartbeat_at
    clock.advance(60)  # 110 s after creation, 60 s after the beat
    assert jobs.get(job.job_id).state == "running"
    clock.advance(1)
    lost = jobs.get(job.job_id)
    assert lost.state == "failed"
    assert lost.error == f"lost: no heartbeat since {beat_at} (the job's process died)"


def test_a_heartbeat_on_a_record_marked_lost_says_so_once_and_does_not_revive_it(jobs, storage, clock, caplog):
    job = jobs.create("m", "manual")
    clock.advance(61)
    assert jobs.get(job.job_id).state == "failed"  # its process was late to start beating
    heartbeat = Heartbeat(jobs, job)
    with caplog.at_level("ERROR", logger="tuneloop.store.jobs"):
        heartbeat.beat()
        heartbeat.beat()
    assert heartbeat.lost and _on_disk(storage, job.job_id)["state"] == "failed"
    assert sum("was marked lost while it runs" in r.message for r in caplog.records) == 1


def test_a_job_marked_lost_before_its_first_beat_stops_before_it_trains(tmp_path):
    """It trained to the end, to be refused at publishing."""
    from tuneloop.core.config import parse_config
    from tuneloop.training.launcher import run_training

    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["a", "b"]}],
                        "storage": {"root": str(tmp_path / "store")}})
    jobs = JobStore(Storage(cfg.storage.root))
    job = jobs.create("m", "feedback")
    jobs.save(job.model_copy(update={"state": "failed", "error": "lost: no heartbeat since it was created"}))
    outcome = run_training(cfg, "m", job=job)  # no Ray: it stops before the data is even read
    assert outcome.manifest is None and outcome.job.state == "failed" and "JobLost" in outcome.job.error


def test_a_job_refused_the_lease_leaves_no_failed_record_unless_another_process_made_it(tmp_path):
    """`tuneloop train` just after a triggered job's record, before its lease: the CLI's
    check passed, its own job was refused, and a failed job stayed on record (its alert)."""
    from tuneloop.core.config import parse_config
    from tuneloop.training.launcher import run_training

    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["a", "b"]}],
                        "storage": {"root": str(tmp_path / "store")}})
    storage = Storage(cfg.storage.root)
    jobs = JobStore(storage)
    holder = jobs.create("m", "feedback")
    lease = take_lease(storage, jobs, holder)
    try:
        outcome = run_training(cfg, "m")
        assert outcome.refused and f"job {holder.job_id}" in outcome.refused and outcome.manifest is None
        assert [j.job_id for j in jobs.all()] == [holder.job_id]  # no record of the refused one
        made_by_controller = jobs.create("m", "feedback")  # the controller's record: the client has its id
        outcome = run_training(cfg, "m", job=made_by_controller)
        assert outcome.refused is None and jobs.get(made_by_controller.job_id).state == "failed"
    finally:
        lease.release()


def test_staleness_threshold_is_a_parameter(storage, clock):
    quick = JobStore(storage, clock=clock, stale_after_s=2)
    job = quick.create("m", "manual")
    clock.advance(2.5)
    assert quick.get(job.job_id).state == "failed"


def test_a_finished_record_is_read_once_per_process_until_its_file_changes(storage, clock):
    """Every sweep, scrape and job start read every record: tens of thousands of GETs a
    time after a year of hourly jobs on an object store."""
    jobs = JobStore(storage, clock=clock)
    done = []
    for _ in range(5):
        done.append(jobs.create("m", "manual"))
        done[-1].state = "succeeded"
        jobs.save(done[-1])
        clock.advance(1)
    running = jobs.create("m", "manual")
    reads = []
    read_json = storage.read_json
    storage.read_json = lambda rel: reads.append(rel) or read_json(rel)
    assert [j.state for j in jobs.all()] == ["succeeded"] * 5 + ["running"]
    assert len(reads) == 6
    reads.clear()
    again = JobStore(storage, clock=clock)  # another reader in the same process (a scrape's)
    assert [j.job_id for j in again.all()] == [j.job_id for j in [*done, running]]
    assert reads == [f"jobs/{running.job_id}.json"]  # only the running one is read again
    done[0].state, done[0].error = "failed", "lost, then its process wrote its end"
    jobs.save(done[0])  # a changed file is read anew
    reads.clear()
    assert jobs.all()[0].state == "failed" and sorted(reads) == sorted(
        [f"jobs/{done[0].job_id}.json", f"jobs/{running.job_id}.json"])


def test_finished_jobs_never_go_stale(jobs, clock):
    job = jobs.create("m", "manual")
    job.state = "succeeded"
    jobs.save(job)
    clock.advance(3600)
    assert jobs.get(job.job_id).state == "succeeded"
    assert [j.state for j in jobs.all()] == ["succeeded"]


def test_reading_all_marks_only_dead_running_jobs_and_persists_it(jobs, storage, clock):
    dead = jobs.create("m", "manual")
    done = jobs.create("m", "manual")
    done.state = "rejected"
    jobs.save(done)
    clock.advance(61)
    alive = jobs.create("other", "feedback")
    states = {j.job_id: j.state for j in jobs.all()}
    assert states == {dead.job_id: "failed", done.job_id: "rejected", alive.job_id: "running"}
    assert _on_disk(storage, dead.job_id)["state"] == "failed" and _on_disk(storage, alive.job_id)["state"] == "running"


def test_all_reports_dead_jobs_as_failed(jobs, clock):
    job = jobs.create("m", "manual")
    clock.advance(61)
    assert [(j.job_id, j.state) for j in jobs.all()] == [(job.job_id, "failed")]


def test_running_finds_the_live_job_of_a_model(jobs, clock):
    assert jobs.running("m") is None
    job = jobs.create("m", "manual")
    jobs.create("other", "manual")
    assert jobs.running("m").job_id == job.job_id
    clock.advance(61)
    assert jobs.running("m") is None  # dead: does not block the next job


@pytest.mark.parametrize("content", ['{"job_id": "cut', '{"job_id": 3}'])
def test_a_cut_job_record_is_left_out_of_the_others_and_named_when_asked_for(jobs, storage, clock, content):
    """One cut jobs/*.json stopped the retrain controller at every start (jobs.all()) and every
    sweep that marks dead jobs; GET /v1/jobs/{id} answered it 500."""
    from tuneloop.core.errors import CorruptStoredFile

    live = jobs.create("m", "manual")
    storage.write_bytes_atomic("jobs/bad0000000000000.json", content.encode())
    assert [j.job_id for j in jobs.all()] == [live.job_id] and jobs.running("m").job_id == live.job_id
    clock.advance(300)
    assert [(j.job_id, j.state) for j in jobs.all()] == [(live.job_id, "failed")]  # the sweep still marks the dead one
    with pytest.raises(CorruptStoredFile, match="bad0000000000000.json is not a file tuneloop can read") as e:
        jobs.get("bad0000000000000")
    assert e.value.status == 503


def test_a_record_finished_meanwhile_is_not_marked_lost(jobs, storage, clock):
    """The staleness decision is re-taken on the record as stored, under the lock."""
    job = jobs.create("m", "manual")
    seen_running = job.model_copy()
    job.state = "succeeded"
    jobs.save(job)
    clock.advance(61)
    assert jobs.fail_running(seen_running, "lost").state == "succeeded"
    assert _on_disk(storage, job.job_id)["state"] == "succeeded"


def test_a_job_marked_lost_while_it_ran_stops_before_publishing(jobs, storage, clock):
    """Beats that stalled (storage throttled) got a live job marked lost; it trained on while
    the next job took the model's lease, and both published."""
    from tuneloop.store.jobs import JobLost

    job = jobs.create("m", "manual")
    jobs.check_still_running(job.job_id)  # alive: nothing to say
    clock.advance(61)
    jobs.all()  # the controller's sweep
    with pytest.raises(JobLost, match="marked failed while it ran .*lost: no heartbeat.*not publishing"):
        jobs.check_still_running(job.job_id)


def test_fail_running_marks_a_job_whose_process_is_known_dead(jobs):
    job = jobs.create("m", "manual")
    failed = jobs.fail_running(job, "lost: the job's process died (WorkerCrashedError)")
    assert (failed.state, failed.error) == ("failed", "lost: the job's process died (WorkerCrashedError)")
    assert jobs.get(job.job_id).state == "failed"


def test_heartbeat_thread_beats_at_start_and_stops_before_the_final_record(jobs, storage, clock):
    job = jobs.create("m", "manual")
    job.pid = 4242
    heartbeat = Heartbeat(jobs, job, every_s=3600).start()
    stored = _on_disk(storage, job.job_id)
    assert stored["heartbeat_at"] == job.heartbeat_at == clock().isoformat(timespec="milliseconds")
    assert stored["pid"] == 4242 and stored["state"] == "running"
    job.state = "succeeded"  # the job's outcome is not published by the heartbeat...
    clock.advance(5)
    heartbeat.beat()
    assert _on_disk(storage, job.job_id)["state"] == "running"
    heartbeat.stop()
    assert not heartbeat._thread.is_alive()
    jobs.save(job)  # ...the job's final save is the last word
    assert _on_disk(storage, job.job_id)["state"] == "succeeded"


def test_records_written_before_heartbeats_still_load(storage, jobs):
    legacy = {"job_id": "abc123", "model": "m", "state": "succeeded", "trigger": "manual", "version": "v2",
              "metrics": None, "error": None, "created_at": "2025-01-01T00:00:00.000+00:00", "finished_at": None}
    storage.write_json_atomic("jobs/abc123.json", legacy)
    job = jobs.get("abc123")
    assert job.state == "succeeded" and job.promoted is None and job.heartbeat_at is None


# -- the per-model lease -----------------------------------------------------------------
def _job(jobs: JobStore, model: str = "m") -> JobRecord:
    return jobs.create(model, "manual")


def test_lease_is_exclusive_per_model_and_released(storage, jobs):
    first, second = _job(jobs), _job(jobs)
    lease = take_lease(storage, jobs, first)
    with pytest.raises(JobRunning, match=f"job {first.job_id} .* is already running for 'm'") as e:
        take_lease(storage, jobs, second)
    assert isinstance(e.value, Conflict) and e.value.status == 409
    take_lease(storage, jobs, _job(jobs, "other")).release()  # other models are not blocked
    lease.release()
    take_lease(storage, jobs, second).release()


def _hold_lease(root: str, job_id: str, conn) -> None:
    """In a child process: take the lease, say so, hold it until told (or killed)."""
    storage = Storage(root)
    jobs = JobStore(storage)
    lease = take_lease(storage, jobs, jobs.get(job_id))
    conn.send("held")
    try:
        conn.recv()  # "release", or EOF when the parent goes away
    except EOFError:
        pass
    lease.release()


@pytest.fixture
def child_holding_lease(storage, jobs):
    # A pipe, not a multiprocessing.Event: setting an Event that a SIGKILLed child was
    # waiting on blocks forever.
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    job = _job(jobs)
    child = ctx.Process(target=_hold_lease, args=(storage.uri, job.job_id, theirs))
    child.start()
    assert ours.poll(60) and ours.recv() == "held", "the child did not take the lease"

    def release() -> None:
        try:
            ours.send("release")
        except OSError:
            pass  # the child is gone

    yield child, job, release
    release()
    child.join(60)
    assert not child.is_alive()


def test_lease_excludes_another_process_until_it_releases(storage, jobs, child_holding_lease):
    child, holder, release = child_holding_lease
    with pytest.raises(JobRunning, match=f"job {holder.job_id} \\(pid {child.pid} "):
        take_lease(storage, jobs, _job(jobs))
    release()
    child.join(60)
    take_lease(storage, jobs, _job(jobs)).release()


def test_lease_of_a_killed_process_is_free_at_once(storage, jobs, child_holding_lease):
    child, _, _ = child_holding_lease
    os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    take_lease(storage, jobs, _job(jobs)).release()


# -- promotion at the end of a job -------------------------------------------------------
@pytest.fixture
def registry(storage, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    reg = Registry(storage)
    for _ in range(3):
        reg.publish("m", str(weights), Manifest(version="pending", model="m", parent=None, base_model="base",
                                                task="text-classification", labels=["a", "b"]))
    return reg


def test_job_promotes_when_production_is_still_its_parent(registry, jobs):
    registry.promote("m", "v1")
    job = _job(jobs)
    promote_or_wait(registry, job, "v2", parent="v1", reason="accuracy up")
    assert registry.production("m") == "v2"
    assert job.promoted is True and "promoted" in job.message
    assert registry.state("m").history[-1].reason == f"job {job.job_id}: accuracy up"


def test_a_promote_whose_answer_was_lost_after_it_landed_counts_once(registry, jobs):
    """On an object store a conditional put's answer can be lost after it landed: the job
    failed (a failed-run alert) with its version production."""
    registry.promote("m", "v1")
    job = _job(jobs)
    promote = registry.promote

    def lost_answer(*args, **kwargs):
        registry.promote = promote  # the next try goes through
        promote(*args, **kwargs)
        raise OSError("connection reset by peer")

    registry.promote = lost_answer
    promote_or_wait(registry, job, "v2", parent="v1", reason="accuracy up")
    state = registry.state("m")
    assert state.production == "v2" and job.promoted is True
    assert [e.event for e in state.history] == ["promote", "promote"]  # v1's and v2's: once


def test_first_version_promotes_only_onto_an_empty_production(registry, jobs):
    job = _job(jobs)
    promote_or_wait(registry, job, "v1", parent=None, reason="first version")
    assert registry.production("m") == "v1" and job.promoted is True


def test_job_leaves_its_version_as_candidate_after_a_rollback(registry, jobs, caplog):
    """The bug: a job finishing after an operator's rollback promoted over it."""
    registry.promote("m", "v1")
    registry.promote("m", "v2")
    job = _job(jobs)  # trains from v2...
    registry.rollback("m", reason="operator: v2 is bad")  # ...while v2 is rolled back
    before = registry.state("m")
    with caplog.at_level("INFO", logger="tuneloop.store.jobs"):
        promote_or_wait(registry, job, "v3", parent="v2", reason="accuracy up")
    state = registry.state("m")
    assert state.production == "v1"  # the rollback stands
    assert state.generation == before.generation + 1
    last = state.history[-1]
    assert (last.event, last.production, last.version) == ("candidate", "v1", "v3")
    assert "production of 'm' is now v1" in last.reason
    assert job.promoted is False
    assert "waits as a candidate" in job.message and 'POST /v1/models/m/promote {"version": "v3"}' in job.message
    assert job.message in caplog.text
    # The operator can still promote it by hand; the candidate entry is no rollback step.
    assert registry.promote("m", "v3").rollback_target() == "v1"


def test_job_record_fields_round_trip(storage, jobs):
    job = _job(jobs)
    job.promoted, job.message, job.pid, job.host = False, "waits", 7, "h"
    jobs.save(job)
    assert _on_disk(storage, job.job_id)["promoted"] is False
    assert jobs.get(job.job_id) == job


def test_a_late_heartbeat_does_not_revive_a_job_marked_lost(jobs, storage, clock):
    """Its host could not write for a minute: another host marked it lost, and the next
    job may have taken the lease. The late beat must leave the record failed."""
    job = jobs.create("m", "manual")
    beat = Heartbeat(jobs, job)
    beat.beat()
    clock.advance(61)
    assert [(j.job_id, j.state) for j in jobs.all()] == [(job.job_id, "failed")]
    beat.beat()
    assert _on_disk(storage, job.job_id)["state"] == "failed"


@pytest.mark.parametrize(("mode", "stage", "percent"), [("shadow", "shadow", 0.0), ("canary", "canary", 5.0)])
def test_a_rollout_mode_makes_the_version_a_challenger_not_production(registry, jobs, mode, stage, percent):
    registry.promote("m", "v1")
    job = _job(jobs)
    hand_over(registry, job, "v2", parent="v1", reason="accuracy up", rollout=RolloutConfig(mode=mode))
    state = registry.state("m")
    assert state.production == "v1" and (state.rollout.version, state.rollout.stage) == ("v2", stage)
    assert state.rollout.percent == percent and job.promoted is False and "challenger" in job.message


def test_gated_leaves_a_candidate_and_the_first_version_is_promoted_whatever_the_mode(registry, jobs):
    first = _job(jobs)
    hand_over(registry, first, "v1", parent=None, reason="first", rollout=RolloutConfig(mode="shadow"))
    assert registry.production("m") == "v1" and first.promoted  # nothing to compare with
    job = _job(jobs)
    hand_over(registry, job, "v2", parent="v1", reason="up", rollout=RolloutConfig(mode="gated"))
    state = registry.state("m")
    assert (state.production, state.rollout, state.history[-1].event) == ("v1", None, "candidate")
    assert "waits for an operator" in job.message


def test_a_second_challenger_waits_as_a_candidate(registry, jobs):
    registry.promote("m", "v1")
    registry.start_rollout("m", "v2", "shadow", 0)
    job = _job(jobs)
    hand_over(registry, job, "v3", parent="v1", reason="up", rollout=RolloutConfig(mode="canary"))
    assert registry.state("m").rollout.version == "v2" and "waits as a candidate" in job.message


def test_a_direct_jobs_version_leaves_an_operators_rollout_under_way(registry, jobs):
    """rollout.mode direct: a job finishing while an operator rolled out another version
    promoted over it, ending the rollout the operator had started."""
    registry.promote("m", "v1")
    job = _job(jobs)  # trains from v1...
    registry.start_rollout("m", "v2", "shadow", 0)  # ...while an operator starts v2's rollout
    hand_over(registry, job, "v3", parent="v1", reason="up", rollout=RolloutConfig(mode="direct"))
    state = registry.state("m")
    assert (state.production, state.rollout.version, state.history[-1].event) == ("v1", "v2", "candidate")
    assert job.promoted is False and "v2 of 'm' is being rolled out (shadow)" in job.message
    assert "waits as a candidate" in job.message
    assert registry.promote("m", "v3").production == "v3"  # an operator still may, ending it


def test_a_direct_jobs_version_leaves_an_operators_canary_of_that_very_version(registry, jobs):
    """An operator started a canary of the job's own version while the job built its
    artifacts: the job promoted it, and the canary the operator chose ended (probe)."""
    registry.promote("m", "v1")
    job = _job(jobs)
    registry.start_rollout("m", "v3", "canary", 50.0)
    hand_over(registry, job, "v3", parent="v1", reason="up", rollout=RolloutConfig(mode="direct"))
    state = registry.state("m")
    assert (state.production, state.rollout.version, state.rollout.stage) == ("v1", "v3", "canary")
    assert job.promoted is False and "v3 of 'm' is being rolled out (canary)" in job.message


def test_a_lease_whose_holder_could_not_be_written_is_given_back(jobs, storage, monkeypatch):
    """On a full disk the lock was taken and never returned: in a pooled Ray worker, which
    lives on, every later job of the model failed as 'already running'."""
    import errno

    from tuneloop.store.storage import FileLock

    def full(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileLock, "write_holder", full)
    with pytest.raises(OSError, match="No space"):
        take_lease(storage, jobs, jobs.create("m", "manual"))
    monkeypatch.undo()
    take_lease(storage, jobs, jobs.create("m", "manual")).release()  # free: no JobRunning


def test_a_training_worker_stops_on_what_its_jobs_record_says_and_judges_no_heartbeat(storage, tmp_path):
    """A worker reading the record through ``get`` judged the heartbeat by its own clock: on a
    node a minute ahead of the driver's, every job marked itself lost at its first look."""
    import time

    from tuneloop.store.jobs import JobLost
    from tuneloop.training.loop import _job_check

    behind = JobStore(storage, clock=lambda: datetime.now(UTC) - timedelta(minutes=10))
    job = behind.create("m", "manual")  # its heartbeat ten minutes old by this process's clock
    check = _job_check({"storage": str(tmp_path / "store"), "job_id": job.job_id, "check_every_s": 0.01}, rank=0)
    time.sleep(0.3)
    check()  # trains on
    assert _on_disk(storage, job.job_id)["state"] == "running"
    behind.fail_running(job, "lost: no heartbeat for 75 s")  # as the driver or the controller mark it
    deadline = time.monotonic() + 5
    with pytest.raises(JobLost, match="was marked failed while it ran"):
        while time.monotonic() < deadline:
            check()
            time.sleep(0.01)


def test_jobs_that_ran_on_a_ray_node_that_stopped_are_marked_failed_at_once(jobs, storage):
    """After `tuneloop run` stopped, its jobs were listed as running for another minute."""
    ours, elsewhere, unplaced, finished = (jobs.create("m", "manual") for _ in range(4))
    for job, node in [(ours, "node-a"), (elsewhere, "node-b"), (finished, "node-a")]:
        job.ray_node = node
        if job is finished:
            job.state, job.finished_at = "succeeded", jobs.now()
        jobs.save(job)
    failed = jobs.fail_running_on_node("node-a", "interrupted: `tuneloop run` stopped while it ran")
    assert [j.job_id for j in failed] == [ours.job_id]
    assert _on_disk(storage, ours.job_id)["error"] == "interrupted: `tuneloop run` stopped while it ran"
    assert [_on_disk(storage, j.job_id)["state"] for j in (elsewhere, unplaced, finished)] == \
        ["running", "running", "succeeded"]

"""Production moves by compare-and-set, and dead jobs do not block the loop:

- an operator's rollback while a retrain runs stands; the job's version waits as a candidate;
- a training process killed mid-job is reported failed (short staleness injected), Ray does
  not retry it, and the next job can take the model's lease.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tuneloop.store.jobs import JobStore
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage
from tests.integration.conftest import LABELS, make_config, publish_version
from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def biased_model(tmp_path_factory) -> str:
    """Predicts "positive" for everything, by a margin one or two small steps cannot undo:
    a job trained from it scores exactly its parent's accuracy, which the gate accepts."""
    return build_tiny_model(tmp_path_factory.mktemp("biased-bert"), LABELS, bias=[-3.0, 3.0])


def _with_v1_v2(tmp_path, biased_model, seed_tsv):
    cfg = make_config(tmp_path / "store", biased_model, seed_tsv, training={"max_steps": 1})
    assert publish_version(cfg, biased_model) == "v1"
    assert publish_version(cfg, biased_model) == "v2"
    return cfg


def test_rollback_during_a_retrain_stands_and_the_new_version_waits(ray_session, biased_model, seed_tsv, tmp_path,
                                                                    monkeypatch):
    from tuneloop.training.launcher import run_training

    cfg = _with_v1_v2(tmp_path, biased_model, seed_tsv)
    storage = Storage(cfg.storage.root)
    registry, jobs = Registry(storage), JobStore(storage)
    assert registry.production("sentiment") == "v2"

    # The job reads production, then fetches its weights: that is the moment to roll back.
    parent_read = threading.Event()
    real_local_path = Registry.local_path

    def spy(self, model, version, cache_dir=None):
        parent_read.set()
        return real_local_path(self, model, version, cache_dir)

    monkeypatch.setattr(Registry, "local_path", spy)
    job = jobs.create("sentiment", "manual")
    seen: dict = {}

    def operator() -> None:
        if parent_read.wait(120):
            seen["job_state"] = jobs.get(job.job_id).state
            seen["rollback"] = registry.rollback("sentiment", reason="operator: v2 is bad")

    rollback = threading.Thread(target=operator)
    rollback.start()
    outcome = run_training(cfg, "sentiment", job=job)  # on the main thread: fit() sets a signal handler
    rollback.join(10)

    assert seen.get("job_state") == "running", seen
    assert seen["rollback"].production == "v1"
    assert outcome.job.state == "succeeded", outcome.job.error
    assert outcome.manifest.version == "v3" and outcome.manifest.parent == "v2"
    assert outcome.manifest.status == "accepted"
    state = registry.state("sentiment")
    assert state.production == "v1"  # the rollback was not undone
    assert [(h.event, h.production, h.version) for h in state.history[-2:]] == [
        ("rollback", "v1", "v1"), ("candidate", "v1", "v3")]
    assert [h.generation for h in state.history] == list(range(1, state.generation + 1))
    record = JobStore(storage).get(job.job_id)
    assert record.state == "succeeded" and record.version == "v3" and record.promoted is False
    assert "waits as a candidate" in record.message and '"version": "v3"' in record.message
    assert record.heartbeat_at and record.pid == os.getpid() and record.finished_at
    # An operator can still take it.
    assert registry.promote("sentiment", "v3", reason="by hand").production == "v3"


def test_killed_training_process_is_reported_failed_and_frees_the_model(ray_session, biased_model, seed_tsv, tmp_path):
    import ray

    from tuneloop.control.controller import RetrainController, _train_job
    from tuneloop.training.launcher import run_training

    cfg = _with_v1_v2(tmp_path, biased_model, seed_tsv)
    storage = Storage(cfg.storage.root)
    jobs = JobStore(storage)
    job = jobs.create("sentiment", "manual")
    ref = _train_job.remote(cfg.model_dump(), "sentiment", "manual", job)  # as the controller starts one

    deadline = time.monotonic() + 120
    record = jobs.get(job.job_id)
    while time.monotonic() < deadline and not (record.pid and record.heartbeat_at):
        assert record.state == "running", record.error
        time.sleep(0.2)
        record = jobs.get(job.job_id)
    assert record.pid and record.heartbeat_at, "the job never started beating"
    assert record.pid != os.getpid()

    # A controller started now (say, after a restart) sees the job and starts no second one.
    controller = RetrainController.remote(cfg.model_dump())
    try:
        assert ray.get(controller.start.remote("sentiment")) is None
        assert ray.get(controller.status.remote())["running"] == ["sentiment"]
    finally:
        ray.kill(controller)

    os.kill(record.pid, signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayError):
        ray.get(ref, timeout=120)  # max_retries=0: no second process resumes the job

    # 60 s in production; here a second past the last beat is enough to call it lost.
    quick = JobStore(storage, stale_after_s=1)
    deadline = time.monotonic() + 30
    lost = quick.get(job.job_id)
    while time.monotonic() < deadline and lost.state == "running":
        time.sleep(0.5)
        lost = quick.get(job.job_id)
    assert lost.state == "failed"
    assert lost.error == f"lost: no heartbeat since {lost.heartbeat_at} (the job's process died)"
    assert JobStore(storage).get(job.job_id).state == "failed"  # persisted for every reader
    assert JobStore(storage).running("sentiment") is None

    # The kernel freed the dead process's lease: the next job runs.
    outcome = run_training(cfg, "sentiment")
    assert outcome.job.state in ("succeeded", "rejected"), outcome.job.error
    assert outcome.manifest.version == "v3"

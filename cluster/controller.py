"""The retrain controller: a Ray actor that counts new feedback and starts training jobs.

It is the edge where cluster/ meets Ray: the decision itself is the pure
``should_retrain``; each job runs as a Ray task so the actor stays responsive and a
crashing job cannot take it down.
"""

from __future__ import annotations

import logging

import ray

from cluster.config import TuneloopConfig
from cluster.jobs import JobRecord, JobStore
from cluster.records import FeedbackStore
from cluster.registry import Registry
from cluster.storage import Storage
from cluster.triggers import should_retrain

log = logging.getLogger(__name__)
CONTROLLER_NAME = "tuneloop-retrain-controller"
# Named actors live in a namespace; Serve replicas run in Serve's, drivers in their own.
CONTROLLER_NAMESPACE = "tuneloop"


@ray.remote(num_cpus=0)
def _train_job(config: dict, model: str, trigger: str, job: JobRecord) -> str:
    from training.launcher import run_training  # imported in the task, not by the actor

    return run_training(TuneloopConfig.model_validate(config), model, trigger=trigger, job=job).job.state


@ray.remote(num_cpus=0, max_concurrency=4)
class RetrainController:
    def __init__(self, config: dict):
        self.config = config
        self.cfg = TuneloopConfig.model_validate(config)
        storage = Storage(self.cfg.storage.root)
        self.jobs = JobStore(storage)
        self.running: dict[str, ray.ObjectRef] = {}
        journal = self.cfg.storage.journal_path()
        self.pending = {m.name: self._untrained_feedback(storage, journal, m.name) for m in self.cfg.models}

    @staticmethod
    def _untrained_feedback(storage: Storage, journal_dir: str, model: str) -> int:
        """Feedback rows that production's training did not see (all of them before v1)."""
        registry, feedback = Registry(storage), FeedbackStore(storage, journal_dir)
        production = registry.production(model)
        used = set()
        if production is not None:
            used = set(registry.manifest(model, production).data.get("feedback", {}).get("files", []))
        return feedback.count_rows([f for f in feedback.files(model) if f not in used])

    def _reap(self) -> None:
        for model, ref in list(self.running.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                del self.running[model]
                try:
                    log.info("retrain of %s ended: %s", model, ray.get(ref))
                except Exception:  # noqa: BLE001 - the job record holds the failure
                    log.exception("retrain task of %s crashed", model)

    def record_feedback(self, model: str, count: int = 1) -> str | None:
        self._reap()
        self.pending[model] = self.pending.get(model, 0) + count
        if should_retrain(self.pending[model], self.cfg.trigger.every_n_feedback, model in self.running):
            return self._start(model, "feedback")
        return None

    def start(self, model: str, trigger: str = "manual") -> str | None:
        """Start a job now; None if one is already running for this model."""
        self._reap()
        return None if model in self.running else self._start(model, trigger)

    def _start(self, model: str, trigger: str) -> str:
        job = self.jobs.create(model, trigger)
        self.pending[model] = 0  # records arriving from now on count towards the next job
        self.running[model] = _train_job.remote(self.config, model, trigger, job)
        log.info("started retrain job %s for %s (%s)", job.job_id, model, trigger)
        return job.job_id

    def status(self) -> dict:
        self._reap()
        return {"pending": dict(self.pending), "running": sorted(self.running)}

"""Training job records: one JSON file per job under <storage>/jobs/, written atomically."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel

from cluster.registry import now_iso
from cluster.storage import Storage

JobState = Literal["running", "succeeded", "rejected", "failed"]


class JobRecord(BaseModel):
    job_id: str
    model: str
    state: JobState = "running"
    trigger: str = "manual"
    version: str | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None
    created_at: str
    finished_at: str | None = None


class JobStore:
    def __init__(self, storage: Storage):
        self.storage = storage

    def create(self, model: str, trigger: str) -> JobRecord:
        job = JobRecord(job_id=uuid.uuid4().hex[:16], model=model, trigger=trigger, created_at=now_iso())
        self.save(job)
        return job

    def save(self, job: JobRecord) -> None:
        self.storage.write_json_atomic(f"jobs/{job.job_id}.json", job.model_dump(mode="json"))

    def get(self, job_id: str) -> JobRecord | None:
        if not job_id.isalnum():
            return None
        raw = self.storage.read_json(f"jobs/{job_id}.json")
        return None if raw is None else JobRecord.model_validate(raw)

    def all(self) -> list[JobRecord]:
        jobs = []
        for rel in self.storage.list_files("jobs", ".json"):
            raw = self.storage.read_json(rel)
            if raw is not None:
                jobs.append(JobRecord.model_validate(raw))
        return sorted(jobs, key=lambda j: j.created_at)

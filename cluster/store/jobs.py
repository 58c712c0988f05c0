"""Training job records: one JSON file per job under <storage>/jobs/, written atomically.

A job's process proves it is alive by refreshing ``heartbeat_at`` (``Heartbeat``). A
process that dies cannot mark its own record failed, so readers do it: a ``running`` record
whose heartbeat is older than ``STALE_AFTER_S`` is marked failed ("lost") by
``JobStore.get``/``all`` when they meet one (the retrain controller's sweep reads them all
every few seconds), so no dead job shows as running forever.

One job per model runs at a time: the job's process holds the model's lease (``take_lease``)
for its whole run, whoever started it (the controller or `tuneloop train`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel

from tuneloop.core.errors import Conflict, CorruptStoredFile, TuneloopError
from tuneloop.core.gate import GateDecision
from tuneloop.core.rollout import RolloutConfig, first_stage
from tuneloop.core.serving_time import ServingTime
from tuneloop.core.tasks import label_set
from tuneloop.store.documents import iso_time, parse_stored, read_stored
from tuneloop.store.registry import Registry
from tuneloop.store.storage import FileLock, Storage

log = logging.getLogger(__name__)

JobState = Literal["running", "succeeded", "rejected", "failed"]
# (storage root, record) -> (the listing's modification time and size, the record) of the
# finished jobs this process read. A finished record does not change, and every sweep, scrape
# and job start reads every record: a year of hourly jobs is tens of thousands of reads each
# time, one GET apiece on an object store. Kept without their gate, metrics and serving time,
# which ``all``'s callers do not read (``get`` reads a record whole).
_FINISHED: dict[tuple[str, str], tuple[tuple[int, int], JobRecord]] = {}
_NOT_KEPT = {"metrics": None, "gate": None, "serving_time": None}

STALE_AFTER_S = 60.0
"""A running job whose heartbeat is older than this is taken for dead."""
HEARTBEAT_EVERY_S = 10.0
"""How often a job's process refreshes its heartbeat: several beats fit in STALE_AFTER_S,
so a slow write or two does not get a live job declared lost."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class JobRecord(BaseModel):
    job_id: str
    model: str
    state: JobState = "running"
    trigger: str = "manual"
    version: str | None = None
    metrics: dict[str, Any] | None = None
    gate: GateDecision | None = None  # the verdict on the job's version, every check's numbers
    error: str | None = None
    # Whether the job's version became production: False for a rejected version and for a
    # candidate left waiting because production moved while the job ran (see ``message``).
    promoted: bool | None = None
    message: str | None = None
    serving_time: ServingTime | None = None  # feedback to serving, by phase (also in the manifest)
    created_at: str
    finished_at: str | None = None
    heartbeat_at: str | None = None
    # Where the job runs: an operator (or a test) can find the process.
    pid: int | None = None
    host: str | None = None
    ray_node: str | None = None  # the Ray node that process ran on: when it stops, so did the job
    # The outcome readers counted first, kept when the job's own process, slow and not dead,
    # writes another over the record that marked it lost: counted by its state, the failed
    # runs fell after a restart of the process counting them, and the failure alert fired.
    counted_as: JobState | None = None


class JobRunning(Conflict):
    """Another job of the same model holds the model's lease."""


class JobLost(RuntimeError):
    """This job's record no longer says running: it was marked lost (its heartbeats did not
    reach storage in time), and its lease may be another job's by now."""


class JobStore:
    """Job records. ``clock`` and ``stale_after_s`` are parameters so that tests can move
    time instead of waiting for it."""

    def __init__(self, storage: Storage, clock: Callable[[], datetime] = _utcnow,
                 stale_after_s: float = STALE_AFTER_S):
        self.storage = storage
        self.clock = clock
        self.stale_after_s = stale_after_s
        self._unreadable: set[str] = set()  # records warned about as unreadable

    def now(self) -> str:
        return iso_time(self.clock())

    def create(self, model: str, trigger: str) -> JobRecord:
        job = JobRecord(job_id=uuid.uuid4().hex[:16], model=model, trigger=trigger, created_at=self.now())
        self.save(job)
        return job

    def save(self, job: JobRecord) -> bool:
        """Every write of a record is a ``Storage.update``, so marking a job lost (a
        read-decide-write by another process, maybe on another host) never overwrites the
        final record its slow, not dead, process wrote meanwhile. False where a running
        record was not written for that: the stored one was marked lost."""
        refused = []

        def write(stored: dict | None) -> dict | None:
            refused.clear()  # a retried compare-and-swap runs this again
            if job.state == "running" and stored is not None and stored.get("state") != "running":
                refused.append(True)
                return None  # marked lost meanwhile (its heartbeat was late): a beat must not revive it
            doc, stored = job.model_dump(mode="json"), stored or {}
            first = stored.get("counted_as") or stored.get("state")
            if first not in (None, "running") and first != doc["state"]:
                doc["counted_as"] = first
            return doc

        self.storage.update_json(f"jobs/{job.job_id}.json", write)
        return not refused

    def discard(self, job: JobRecord) -> None:
        """Remove the record of a job that never started (it was refused the model's lease)."""
        self.storage.delete_file(f"jobs/{job.job_id}.json")

    def stored(self, job_id: str) -> JobRecord | None:
        """The record as stored, no staleness judged (``get`` marks a stale one lost): for a
        reader whose clock is not the driver's, a training worker on another node, which
        with its clock a minute ahead marked every job lost at its first look."""
        return read_stored(self.storage, JobRecord, f"jobs/{job_id}.json")  # cut or hand-edited: CorruptStoredFile

    # -- staleness -----------------------------------------------------------------------
    def is_stale(self, job: JobRecord) -> bool:
        """A running job whose process has not beaten for ``stale_after_s`` (counted from its
        creation if it never beat: its process may never have started)."""
        if job.state != "running":
            return False
        last = datetime.fromisoformat(job.heartbeat_at or job.created_at)
        return self.clock() - last > timedelta(seconds=self.stale_after_s)

    def _lost_error(self, job: JobRecord) -> str | None:
        if not self.is_stale(job):
            return None
        if job.heartbeat_at:
            return f"lost: no heartbeat since {job.heartbeat_at} (the job's process died)"
        return (f"lost: no heartbeat since it was created at {job.created_at} "
                "(the job's process died or never started)")

    def _fail_if(self, job: JobRecord, error_of: Callable[[JobRecord], str | None]) -> JobRecord:
        """Mark the job failed with ``error_of(record)`` unless that is None, deciding on the
        record as it is at the write: its process may have just written its end."""
        errors: list[str] = []

        rel = f"jobs/{job.job_id}.json"

        def fail(raw: dict | None) -> dict | None:
            errors.clear()  # a retried compare-and-swap runs this again
            current = job if raw is None else parse_stored(self.storage, JobRecord, raw, rel)
            error = error_of(current)
            if error is None:
                return None
            errors.append(error)
            current.state, current.error, current.finished_at = "failed", error, self.now()
            return current.model_dump(mode="json")

        current = JobRecord.model_validate(self.storage.update_json(rel, fail) or job.model_dump(mode="json"))
        if errors:
            log.warning("job %s of %s marked failed: %s", current.job_id, current.model, errors[0])
        return current

    def _settle(self, job: JobRecord) -> JobRecord:
        """The record as it should read: a stale running job is marked failed (persisted)."""
        return self._fail_if(job, self._lost_error) if self.is_stale(job) else job

    def fail_running(self, job: JobRecord, error: str) -> JobRecord:
        """Mark a job failed if its record still says running: its process is known dead."""
        return self._fail_if(job, lambda current: error if current.state == "running" else None)

    # -- reading -------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        """The record, with a dead running job reported (and persisted) as failed."""
        if not (len(job_id) <= 64 and job_id.isascii() and job_id.isalnum()):  # no such file name: a 404
            return None
        job = self.stored(job_id)
        return None if job is None else self._settle(job)

    def _read_all(self) -> list[JobRecord]:
        """Every readable record; a finished one this process read before, unless its file
        changed, from ``_FINISHED``. One that is cut or hand-edited is left out, with a warning
        once per process: it stopped the retrain controller at every start, and every sweep
        that marks dead jobs (``GET /v1/jobs/{id}`` answers it 503 corrupt_stored_file)."""
        jobs = []
        for info in self.storage.list_dir("jobs"):
            if not (info.is_file and info.base_name.endswith(".json")):
                continue
            rel, seen = f"jobs/{info.base_name}", (info.mtime_ns, info.size)
            cached = _FINISHED.get((self.storage.uri, rel))
            if cached is not None and None not in seen and cached[0] == seen:
                jobs.append(cached[1])
                continue
            try:
                job = read_stored(self.storage, JobRecord, rel)
            except CorruptStoredFile as e:
                if rel not in self._unreadable:
                    self._unreadable.add(rel)
                    log.warning("%s; it is left out of the job records until it is fixed", e.message)
                continue
            if job is not None:
                jobs.append(job)
                if job.state != "running" and None not in seen:
                    _FINISHED[self.storage.uri, rel] = seen, job.model_copy(update=_NOT_KEPT)
        return sorted(jobs, key=lambda j: j.created_at)

    def all(self, settle: bool = True) -> list[JobRecord]:
        """Every readable record, a dead running job's marked failed (persisted) first; a
        finished job's may come without its gate, metrics and serving time (``_FINISHED``).
        ``settle`` False: as stored, none marked, for a reader off the cluster whose clock may
        be a minute off the jobs' (an operator's laptop after a sleep): `tuneloop jobs` and
        `tuneloop deploy status` marked live jobs lost, which then never published."""
        return [self._settle(j) for j in self._read_all()] if settle else self._read_all()

    def check_still_running(self, job_id: str) -> None:
        """Raise JobLost unless the job's stored record still says running. A job whose beats
        stalled (storage throttled, a partition) was marked lost and trained on; the next job
        took its lease, and both published. Its training workers ask too, every
        ``HEARTBEAT_EVERY_S``: a lost job's training ran to its end on the GPUs the next job
        of the model was waiting for."""
        stored = self.stored(job_id)
        if stored is None or stored.state != "running":
            raise JobLost(f"job {job_id} was marked {stored.state if stored else 'gone'} while it ran"
                          + (f" ({stored.error})" if stored is not None and stored.error else "")
                          + ": another job may hold its lease; not publishing")

    def fail_running_on_node(self, ray_node: str, why: str) -> list[JobRecord]:
        """Running jobs whose process ran on ``ray_node``, a node that stopped, marked failed
        with ``why`` now: after `tuneloop run` stopped (its Ray, and the jobs in it, with it)
        they were listed as running for another minute, until their heartbeats went stale."""
        return [self.fail_running(job, why) for job in self.all()
                if job.state == "running" and job.ray_node == ray_node]

    def running(self, model: str) -> JobRecord | None:
        """The live running job of ``model``, if any (dead ones are marked failed first)."""
        return next((j for j in self.all() if j.model == model and j.state == "running"), None)


class Heartbeat:
    """Refreshes a running job's ``heartbeat_at`` every ``every_s`` from a daemon thread.

    It writes a snapshot of the record as it was when started, plus the new time, so it
    never publishes the job thread's half-updated outcome; ``stop`` joins the thread, so the
    record the job writes after ``stop`` is the last word.
    """

    def __init__(self, jobs: JobStore, job: JobRecord, every_s: float = HEARTBEAT_EVERY_S):
        self.jobs, self.job, self.every_s = jobs, job, every_s
        self._snapshot = job.model_copy()
        self.lost = False  # the stored record was marked lost: beats no longer reach it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job.job_id}", daemon=True)

    def beat(self) -> None:
        self.job.heartbeat_at = self._snapshot.heartbeat_at = self.jobs.now()
        if not self.jobs.save(self._snapshot) and not self.lost:
            self.lost = True  # said once: the beats stop reaching the record, and the job will not publish
            log.error("job %s was marked lost while it runs (its heartbeat was late, or another host's clock is "
                      "ahead): it will not publish its version", self.job.job_id)

    def start(self) -> Heartbeat:
        self.beat()  # at once: the record says who runs it before anyone looks
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat is retried; 6 in a row make it stale
                log.exception("job %s: heartbeat failed", self.job.job_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def take_lease(storage: Storage, jobs: JobStore, job: JobRecord) -> FileLock | RecordLease:
    """Take ``job.model``'s lease for ``job`` or raise JobRunning naming the job that holds it.

    The right to run a job of a model, held by one process for the job's whole run, and
    given back by ``release()``. On a local root it is the file lock ``<root>/jobs/<model>.lock``
    (``Storage.file_lock``): the kernel releases it when the process exits, however it dies,
    so a killed job never blocks the next one. The holder writes its job id into the file,
    so a refused job can name it.

    Object stores have no lock that dies with its process: there it is ``RecordLease``.
    """
    if not storage.is_local:
        return RecordLease.take(storage, jobs, job)
    rel = f"jobs/{job.model}.lock"
    lease = storage.file_lock(rel, wait=False)
    if lease is None:
        with open(storage.path(rel), errors="replace") as f:
            holder = f.read(200).strip() or "another job"
        raise JobRunning(f"{holder} is already running for {job.model!r} (it holds {storage.path(rel)}); "
                         "wait for it to finish")
    try:
        lease.write_holder(f"job {job.job_id} (pid {os.getpid()} on {socket.gethostname()})")
    except BaseException:  # a full disk: the lock must not stay with this (pooled, long-lived) process
        lease.release()
        raise
    return lease


class RecordLease:
    """A model's lease on an object store: ``jobs/<model>.lease`` names the job holding it,
    taken and given back by compare-and-swap (``Storage.update``), so two hosts starting a
    job at once cannot both win. A holder whose record no longer says running (it finished,
    or its heartbeat stopped and it was marked lost: at most ``STALE_AFTER_S`` after its
    process died) holds nothing, and the next job takes the lease over."""

    def __init__(self, storage: Storage, rel: str, job_id: str):
        self.storage, self.rel, self.job_id = storage, rel, job_id

    @classmethod
    def take(cls, storage: Storage, jobs: JobStore, job: JobRecord) -> RecordLease:
        rel = f"jobs/{job.model}.lease"

        def take_unless_held(doc: dict | None) -> dict:
            holder = (doc or {}).get("job_id")
            if holder and holder != job.job_id:
                other = jobs.get(holder)  # a dead holder is settled as failed here
                if other is not None and other.state == "running":
                    raise JobRunning(f"job {holder} ({doc.get('where', '?')}) is already running for "
                                     f"{job.model!r}; wait for it to finish")
            return {"job_id": job.job_id, "where": f"pid {os.getpid()} on {socket.gethostname()}", "at": jobs.now()}

        storage.update_json(rel, take_unless_held)
        return cls(storage, rel, job.job_id)

    def release(self) -> None:
        self.storage.update_json(self.rel, lambda doc: {} if (doc or {}).get("job_id") == self.job_id else None)


def _job_change(job: JobRecord, change: Callable[[str], Any]) -> Any:
    """``change(request)`` with the job's request id, sent once more if it failed on the way:
    an object store's answer lost after a conditional put that landed failed the job (a
    failed-run alert) with its version production. The id makes a landed first try count
    once (``RegistryState.carried_out``); the store's refusals (Conflict) are answers."""
    request = f"job {job.job_id}"
    try:
        return change(request)
    except TuneloopError:
        raise
    except Exception as e:  # noqa: BLE001 - storage's own errors, of many types (botocore's, OSError)
        log.warning("job %s: changing production's state failed (%s: %s); trying once more", job.job_id,
                    type(e).__name__, e)
        return change(request)


def promote_or_wait(registry: Registry, job: JobRecord, version: str, parent: str | None, reason: str) -> None:
    """Promote a job's accepted ``version`` if production is still the ``parent`` it trained
    from and was gated against; otherwise leave it waiting as a candidate.

    Production moving during the job means someone decided (an operator rolled back, or
    promoted another version): that decision stands, and the job's gate compared against a
    parent that is no longer production. So does a rollout an operator started meanwhile:
    promoting would end it. Sets ``job.promoted`` and ``job.message``.
    """
    try:
        _job_change(job, lambda request: registry.promote(
            job.model, version, reason=f"job {job.job_id}: {reason}", expect_production=parent, over_rollout=False,
            request=request))
    except Conflict as e:
        registry.record_candidate(
            job.model, version, reason=f"job {job.job_id} trained from {parent or 'the base model'}, "
                                       f"but an operator decided meanwhile: {e.message}")
        job.promoted = False
        job.message = (f"{version} passed the gate against {parent or 'no production'} but was not promoted "
                       f"({e.message}): it waits as a candidate. To promote it: "
                       f'POST /v1/models/{job.model}/promote {{"version": "{version}"}}')
        log.info("job %s: %s", job.job_id, job.message)
        return
    job.promoted = True
    job.message = f"{version} promoted to production ({reason})"


def hand_over(registry: Registry, job: JobRecord, version: str, parent: str | None, reason: str,
              rollout: RolloutConfig) -> None:
    """What becomes of a job's accepted ``version``, by ``rollout.mode``: production at once
    (direct; also the first version, which has no production to be compared with), a
    candidate waiting for an operator (gated), or production's challenger in a rollout
    (shadow, canary). Sets ``job.promoted`` and ``job.message``."""
    production = registry.manifest(job.model, parent) if parent is not None else None
    candidate = registry.manifest(job.model, version)
    if rollout.mode == "direct" or production is None or \
            label_set(production.task, production.labels) != label_set(candidate.task, candidate.labels):
        # Production trained for other labels cannot serve beside it, nor be compared with it.
        promote_or_wait(registry, job, version, parent, reason)
        return
    job.promoted = False
    if rollout.mode == "gated":
        registry.record_candidate(job.model, version, reason=f"job {job.job_id}: {reason}; rollout.mode is gated")
        job.message = (f"{version} passed the gate and waits for an operator (rollout.mode: gated): "
                       f"`tuneloop rollout {job.model} start {version}` or promote it")
        return
    stage, _, percent = first_stage(rollout.mode, rollout.canary_steps)
    try:
        _job_change(job, lambda request: registry.start_rollout(
            job.model, version, stage, percent, f"job {job.job_id}: {reason}", expect_production=parent,
            request=request))
    except Conflict as e:
        registry.record_candidate(job.model, version, reason=f"job {job.job_id}: not rolled out: {e.message}")
        job.message = f"{version} passed the gate but was not rolled out ({e.message}): it waits as a candidate"
        return
    job.message = f"{version} passed the gate and is production's challenger ({stage}" + \
        (f" {percent:g}%)" if stage == "canary" else ")")

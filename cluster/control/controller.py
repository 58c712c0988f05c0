"""The retrain controller: a Ray actor that counts new feedback and starts training jobs.

It is the edge where cluster/ meets Ray: the decision itself is the pure
``which_trigger``; each job runs as a Ray task so the actor stays responsive and a
crashing job cannot take it down. It also sweeps the job records for dead jobs
(``JobStore.all``, which settles them), so a job whose process died is marked failed about a
minute later (``STALE_AFTER_S`` and the next sweep).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from collections import deque
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import Any

import ray

from tuneloop.core.config import TuneloopConfig
from tuneloop.core.errors import CorruptStoredFile
from tuneloop.core.quarantine import ANONYMOUS
from tuneloop.core.tasks import model_tasks
from tuneloop.store.jobs import JobRecord, JobStore
from tuneloop.store.quarantine import QuarantineBook
from tuneloop.control.rollout_driver import RolloutDriver
from tuneloop.serving.metric_files import cluster_metric_files
from tuneloop.serving.metrics import version_health
from tuneloop.store.feedback_store import FeedbackStore
from tuneloop.store.records import PREDICTIONS_ROOT, SHADOW_ROOT, PredictionLog
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage
from tuneloop.core.triggers import online_accuracy, which_trigger

log = logging.getLogger(__name__)
SWEEP_EVERY_S = 10.0  # how often dead jobs are looked for, besides on every call
PRUNE_EVERY_S = 3600.0  # how often removed models' prediction logs are held to retention
# How long the registry state read for a feedback record serves the records after it. Every
# record reached the controller as a call of its own, and each read the state from storage
# with the lock held: one object-store GET (tens of ms) a record, so on S3 the controller
# fell behind at a few dozen records/s while the journal acknowledges thousands. A rollout
# or a new production now reaches the triggers up to this much later.
STATE_REFRESH_S = 1.0
# Production's judged predictions remembered, in agreement windows (trigger.accuracy_window):
# 200 x 50 ids, about a megabyte a model.
JUDGED_MEMORY = 50
# After a launch failed (the cluster refused the task), automatic triggers wait this long
# before the next try; an operator's retrain tries at once.
LAUNCH_RETRY_S = 60.0


# max_retries=0: a job whose process died is over (its record says so); a retry would train
# again under the same job id on a newer snapshot. The next trigger starts a fresh job.
@ray.remote(num_cpus=0, max_retries=0)
def _train_job(config: dict, model: str, trigger: str, job: JobRecord) -> str:
    from tuneloop.serving.optimize import optimize_version  # imported in the task, not by the actor
    from tuneloop.training.launcher import run_training

    # The job's handle to the ingress logs Serve's start of its router at info, an object's
    # repr ("Started <ray.serve._private.router.SharedRouterLongPollClient object at ...>"),
    # as `tuneloop train` quiets it in its own process.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    return run_training(TuneloopConfig.model_validate(config), model, trigger=trigger, job=job,
                        optimize=optimize_version).job.state


class Retrainer:
    """One job per model: ``running`` maps a model to its live job, whoever started it (this
    controller, a predecessor that died, or `tuneloop train`), rebuilt from the job records
    at start. Methods run on up to 4 threads, plus the sweeper's: ``_lock`` guards the maps.
    The job's own lease (store/jobs.py) is the last word; this keeps the API honest (409).

    Its collaborators come through the constructor: the job store, the registry (production
    and its golden accuracy, for the accuracy-drop trigger), ``launch`` (starts a job and
    returns a ``concurrent.futures.Future`` of its final state), the feedback not yet trained
    on and a clock, so its decisions are unit-tested with a fake launch and no Ray.
    ``parts_from_config`` builds the real ones; ``RetrainController`` is this class as a Ray
    actor. The sweeper also fires the schedule trigger, and starts a distilled student's job
    when its teacher's production changed."""

    def __init__(self, cfg: TuneloopConfig, jobs: JobStore, registry: Registry,
                 launch: Callable[[str, str, JobRecord], Future], pending: dict[str, int], *,
                 counted: dict[str, set[str]] | None = None,
                 clock: Callable[[], float] = time.time, sweep_every_s: float | None = SWEEP_EVERY_S,
                 state_refresh_s: float = STATE_REFRESH_S,
                 judged: dict[str, tuple[str | None, list[tuple[str, bool]], int]] | None = None):
        self.cfg, self.jobs, self.registry, self._launch, self._clock = cfg, jobs, registry, launch, clock
        self._state_refresh_s = state_refresh_s
        self._state_read_at: dict[str, float] = {}  # model -> when its registry state was last read
        self._records_read_at = float("-inf")  # when the records of jobs started elsewhere were last read
        self._lock = threading.Lock()
        records = self.jobs.all()
        self.running: dict[str, str] = {j.model: j.job_id for j in records if j.state == "running"}
        self.tasks: dict[str, Future] = {}  # model -> the job this controller started
        self.pending = dict(pending)
        # model -> the predictions whose feedback ``pending`` counts: a second answer on one
        # of them replaces the first in training (the newest wins) and is not counted again.
        # Past the count that fires (or 1, which the schedule needs), repeats no longer matter:
        # the sets stay that small when jobs are rare or only manual.
        self._counted_cap = max(1, cfg.trigger.every_n_feedback)
        self.counted: dict[str, set[str]] = {m: set(sorted(ids)[:self._counted_cap])
                                             for m, ids in (counted or {}).items()}
        self.last_started: dict[str, float] = {}  # model -> when its newest job was created
        # Job records already accounted for: those there at the start (the counts above
        # begin after the newest) and those this controller started, or failed to (a few a day).
        self._seen_jobs: set[str] = {j.job_id for j in records}
        self._launch_failed_at: dict[str, float] = {}  # model -> when its last launch failed
        self._configured = {m.name for m in cfg.models}
        for j in records:
            if j.state != "running" and j.heartbeat_at is None:
                continue  # never ran (a launch refused): the schedule waited a whole interval after it
            self.last_started[j.model] = max(self.last_started.get(j.model, 0.0),
                                             datetime.fromisoformat(j.created_at).timestamp())
        # Whether users agreed with each of production's predictions that got feedback.
        self.agreements: dict[str, deque[bool]] = {}
        # model -> the predictions of production's judged so far, oldest first (and as a set):
        # a repeated answer on one is not judged again, or one client re-answering a prediction
        # filled the window and started accuracy-drop jobs one after another. Remembered for
        # JUDGED_MEMORY windows, well past the window itself: held to its size, a client
        # cycling through one id more than the window judged each answer anew.
        self._judged: dict[str, tuple[deque[str], set[str]]] = {}
        self._held: dict[str, tuple[float, set[str]]] = {}  # model -> (read at, keys the quarantine holds)
        self.judged_since_start: dict[str, int] = {}  # model -> agreements recorded since its newest job started
        self._production: dict[str, tuple[str | None, float | None]] = {}  # model -> (version, golden accuracy)
        # The accuracy-drop windows of before a restart (``_judged_feedback``), kept while
        # production is the version they are of.
        self._judged_of: dict[str, str] = {}
        for model, (version, answers, after_job) in (judged or {}).items():
            if version is None:
                continue
            self.agreements[model] = deque((a for _, a in answers), maxlen=cfg.trigger.accuracy_window)
            remembered = deque(pid for pid, _ in answers[-JUDGED_MEMORY * cfg.trigger.accuracy_window:])
            self._judged[model] = (remembered, set(remembered))
            self.judged_since_start[model] = after_job
            self._judged_of[model] = version
        self._in_rollout: dict[str, bool] = {}  # model -> a challenger is being rolled out (read with production)
        self.learned_from: dict[str, str | None] = {}  # student -> its teacher's version its newest job was for
        self.retiring = False  # set while handing over to a successor: no new job starts
        self._pruned_at: float | None = None  # when removed models' prediction logs were last pruned
        if sweep_every_s is not None:
            threading.Thread(target=self._sweep_forever, args=(sweep_every_s,), name="job-sweeper",
                             daemon=True).start()

    @classmethod
    def parts_from_config(cls, config: dict) -> dict[str, Any]:
        """The real collaborators: job records in the storage root, jobs as Ray tasks, and
        the feedback that production's training did not see, counted from the files."""
        cfg = TuneloopConfig.model_validate(config)
        storage = Storage(cfg.storage.root)
        journal = cfg.storage.journal_path()

        def launch(model: str, trigger: str, job: JobRecord) -> Future:
            return _train_job.remote(config, model, trigger, job).future()

        feedback, registry, jobs = FeedbackStore(storage, journal, model_tasks(cfg.models)), Registry(storage), \
            JobStore(storage)
        started = {}  # model -> when its newest job started
        for job in jobs.all():
            if job.state != "running" and job.heartbeat_at is None:
                continue  # never ran (a launch the cluster refused): it trained on nothing, as the sweep reads it
            started[job.model] = max(started.get(job.model, job.created_at), job.created_at)
        tasks = model_tasks(cfg.models)
        untrained, judged = {}, {}
        for m in cfg.models:
            try:
                # Feedback of a key the quarantine holds counts toward no trigger, after a restart too.
                held = QuarantineBook(storage).quarantined(m.name)
                untrained[m.name] = cls._untrained_feedback(registry, feedback, m.name, started.get(m.name), held)
            except Exception:  # noqa: BLE001 - one model's cut state.json stopped every model's controller
                log.exception("retrain controller: could not count %s's feedback since its last job; its triggers "
                              "count from now", m.name)
                untrained[m.name] = (0, set())
                continue
            if cfg.trigger.accuracy_drop is not None:
                try:  # apart: a window that cannot be rebuilt wiped the count read just before it
                    judged[m.name] = cls._judged_feedback(registry, feedback, tasks[m.name], m.name,
                                                          started.get(m.name), held)
                except Exception:  # noqa: BLE001 - a stored row the task cannot judge
                    log.exception("retrain controller: could not rebuild %s's accuracy window; it fills from now",
                                  m.name)
        return {"cfg": cfg, "jobs": jobs, "registry": registry, "launch": launch,
                "pending": {m: n for m, (n, _) in untrained.items()},
                "counted": {m: ids for m, (_, ids) in untrained.items()}, "judged": judged}

    @staticmethod
    def _judged_feedback(registry: Registry, feedback: FeedbackStore, task, model: str, newest_job: str | None,
                         held: set[str]) -> tuple[str | None, list[tuple[str, bool]], int]:
        """(production, whether users agreed with each of its predictions that got feedback
        from a key the quarantine does not hold, judged on the first answer, oldest first,
        how many were judged after the newest job started): the accuracy-drop window as the
        running controller kept it. A restart (any config change) emptied it, and the
        trigger waited for a whole window of new answers, days at low traffic."""
        production = registry.production(model)
        if production is None:
            return None, [], 0
        since = datetime.fromisoformat(registry.manifest(model, production).created_at)
        first: dict[str, tuple[datetime, bool]] = {}  # in the order of their first answers
        # The columns a judgment reads, not the texts: months of feedback in the controller actor.
        rows = feedback.read_since(model, (since, ""),
                                   columns=("prediction_id", "version", "key_id", *task.feedback_columns))
        for row in sorted(rows.to_pylist(), key=lambda r: r["created_at"]):
            if row.get("version") == production and row.get("prediction_id") is not None \
                    and (row.get("key_id") or ANONYMOUS) not in held:
                first.setdefault(row["prediction_id"], (row["created_at"], task.agrees(row)))
        started = datetime.fromisoformat(newest_job) if newest_job else None
        after_job = sum(1 for at, _ in first.values() if started is None or at > started)
        return production, [(pid, agreed) for pid, (_, agreed) in first.items()], after_job

    @staticmethod
    def _untrained_feedback(registry: Registry, feedback: FeedbackStore, model: str,
                            newest_job: str | None, held: set[str]) -> tuple[int, set[str]]:
        """Feedback newer than what production trained on (all of it before v1) and than the
        newest job's start, and the predictions it is about: a job that failed or was
        rejected had it, and, as in a running controller, it waits for the next job rather
        than start one at once (a model whose jobs kept failing started one after every
        restart). Answers on one prediction count once: the newest replaces the others."""
        production = registry.production(model)
        after = registry.manifest(model, production).watermark() if production else None
        if newest_job is not None:
            started = (datetime.fromisoformat(newest_job), "")
            after = started if after is None else max(after, started)
        rows = feedback.read_since(model, after, columns=("prediction_id", "key_id"))
        # Not the ``held`` keys' rows: counted here, a flagged flood started a job at every restart.
        ids = [i for i, key in zip(rows.column("prediction_id").to_pylist(), rows.column("key_id").to_pylist(),
                                   strict=True) if (key or ANONYMOUS) not in held]
        on_predictions = {i for i in ids if i is not None}
        return sum(i is None for i in ids) + len(on_predictions), on_predictions

    def _sweep_forever(self, every_s: float) -> None:
        """``sweep`` every ``every_s``, even when no request comes."""
        while True:
            time.sleep(every_s)
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - storage hiccup: try again next round
                log.exception("sweeping job records failed")

    def sweep(self) -> None:
        """Marks dead jobs failed (jobs of any model, including `tuneloop train` jobs this
        controller never saw), notices jobs started elsewhere, and runs the schedule and the
        students' following of their teachers."""
        records = self.jobs.all()  # marks the dead ones failed
        with self._lock:
            self._notice_jobs_started_elsewhere(records)
            self._reap()
            for m in self.cfg.models:
                try:
                    self._maybe_start(m.name)  # the schedule
                except Exception:  # noqa: BLE001 - one model's cut state.json must not stop the others'
                    log.exception("sweep: could not check %s's triggers", m.name)
            self._follow_teachers()
        if self._pruned_at is None or self._clock() - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = self._clock()
            self.prune_removed_models()

    def prune_removed_models(self) -> list[str]:
        """``predictions.retention_days`` for the prediction logs (served and shadow) of
        models taken out of the config: each replica prunes its own model's, and no replica
        serves these any more, so their days stayed for good. Returns what it dropped."""
        days = self.cfg.predictions.retention_days
        if days is None:
            return []
        cutoff = (datetime.fromtimestamp(self._clock(), UTC) - timedelta(days=days)).date()
        configured = {m.name for m in self.cfg.models}
        storage, dropped = self.registry.storage, []
        for root in (PREDICTIONS_ROOT, SHADOW_ROOT):
            predictions = PredictionLog(storage, {}, root=root)
            for folder in storage.list_dir(root):
                if folder.base_name not in configured:
                    days_gone = predictions.drop_days_before(folder.base_name, cutoff)
                    dropped += [f"{root}/{folder.base_name}/{d}" for d in days_gone]
        if dropped:
            log.info("prediction logs of models no longer configured: dropped %d days past retention (%s)",
                     len(dropped), ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""))
        return dropped

    def _reap(self, check_records: bool = True) -> None:
        """Forget finished tasks and jobs; called with ``_lock`` held. ``check_records``:
        also read the records of jobs started elsewhere (one storage read each), which
        the sweeper does every few seconds and a feedback record at most every ``state_refresh_s``."""
        for model, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[model]
                # Read production and the rollout anew before the next trigger: the job may have
                # just handed its version to a rollout, which a cached read (up to a second old)
                # missed, and a second job started whose version could only wait.
                self._state_read_at.pop(model, None)
                try:
                    log.info("retrain of %s ended: %s", model, task.result())
                except Exception as e:  # noqa: BLE001 - run_training never raises: its process died
                    log.exception("retrain task of %s crashed", model)
                    job = self._job_record(self.running.get(model))
                    if job is not None:
                        self.jobs.fail_running(job, f"lost: the job's process died ({type(e).__name__})")
                self.running.pop(model, None)  # its record is final: the task wrote it, or it was failed above
        if check_records:
            self._records_read_at = self._clock()
        for model, job_id in list(self.running.items()) if check_records else ():
            if model not in self.tasks:
                job = self._job_record(job_id)  # marks it failed if its heartbeat stopped
                if job is None or job.state != "running":
                    del self.running[model]
                    self._state_read_at.pop(model, None)

    def _job_record(self, job_id: str | None) -> JobRecord | None:
        """The job's record, None for none or one that is cut or was edited by hand, which
        ``JobStore.all`` leaves out too: raised, it stopped every model's triggers, feedback
        calls and status."""
        try:
            return self.jobs.get(job_id) if job_id else None
        except CorruptStoredFile as e:
            log.warning("%s; the controller no longer waits for that job", e.message)
            return None

    def record_feedback(self, model: str, version: str | None = None, agreed: bool | None = None,
                        prediction_id: str | None = None, key_id: str | None = None) -> str | None:
        """One new feedback record; ``agreed``: whether it agrees with the prediction of
        ``version`` it is about (None for feedback given as a text), ``prediction_id`` that
        prediction's, ``key_id`` the key that sent it. Returns the job id if a trigger fired."""
        with self._lock:
            # The records of jobs started elsewhere at most every state_refresh_s: a read each on
            # every feedback record, under the lock, for the whole of a `tuneloop train` or RayJob job.
            self._reap(check_records=self._clock() - self._records_read_at >= self._state_refresh_s)
            if (key_id or ANONYMOUS) in self._held_keys(model):
                return None  # the job holds it out of training: it starts none either
            counted = self.counted.setdefault(model, set())
            if prediction_id is None or prediction_id not in counted:  # four relabellings are one row to train
                self.pending[model] = self.pending.get(model, 0) + 1
                if prediction_id is not None and len(counted) < self._counted_cap:
                    counted.add(prediction_id)
            production = self._production_of(model)
            if agreed is not None and version is not None and version == production[0] \
                    and self._first_judgment(model, prediction_id):
                window = self.agreements.setdefault(model, deque(maxlen=self.cfg.trigger.accuracy_window))
                window.append(agreed)
                self.judged_since_start[model] = self.judged_since_start.get(model, 0) + 1
            return self._maybe_start(model, production)

    def _first_judgment(self, model: str, prediction_id: str | None) -> bool:
        """Whether ``prediction_id`` was not judged yet under this production (and now is;
        ``_production_of`` forgets them with the window when production changes)."""
        order, ids = self._judged.setdefault(model, (deque(), set()))
        if prediction_id is None:
            return True
        if prediction_id in ids:
            return False
        order.append(prediction_id)
        ids.add(prediction_id)
        while len(order) > JUDGED_MEMORY * self.cfg.trigger.accuracy_window:
            ids.discard(order.popleft())
        return True

    def _held_keys(self, model: str) -> set[str]:
        """The keys the quarantine holds for ``model``, read at most every state_refresh_s."""
        read_at, keys = self._held.get(model, (float("-inf"), set()))
        if self._clock() - read_at >= self._state_refresh_s:
            try:
                keys = QuarantineBook(self.registry.storage).quarantined(model)
            except Exception as e:  # noqa: BLE001 - the bucket's hiccup: the last keys stand
                log.warning("retrain trigger: quarantine book of %s unreadable: %s", model, e)
            self._held[model] = (self._clock(), keys)
        return keys

    def _production_of(self, model: str) -> tuple[str | None, float | None]:
        """Production's version and its accuracy on the golden set, read from the registry at
        most every ``state_refresh_s``; a new production starts a new agreement window."""
        now, cached = self._clock(), self._production.get(model)
        if cached is not None and now - self._state_read_at.get(model, float("-inf")) < self._state_refresh_s:
            return cached
        state = self.registry.state(model)
        self._state_read_at[model] = now
        version = state.production
        self._in_rollout[model] = state.rollout is not None
        if cached is None or cached[0] != version:
            metrics = self.registry.manifest(model, version).metrics if version else None
            cached = (version, metrics.accuracy if metrics and metrics.eval_rows else None)
            self._production[model] = cached
            if self._judged_of.pop(model, None) != version:  # not the window rebuilt at the start
                self.agreements.pop(model, None)
                self._judged.pop(model, None)
        return cached

    def _maybe_start(self, model: str, production: tuple[str | None, float | None] | None = None) -> str | None:
        """Start a job if a trigger fires; called with ``_lock`` held. ``production``: what
        ``_production_of`` gave the caller already (else it is read here)."""
        _, golden_accuracy = production or self._production_of(model)
        if self._in_rollout.get(model):
            # Its version would start no rollout of its own while one runs (a 409 in
            # hand_over): it would only wait as a candidate. The records keep counting.
            return None
        # Only agreements judged since the last job started: the window that fired holds the
        # same disagreements, and after a rejected or failed job it fired again at every
        # feedback record, job after job. A full window of new ones fires again.
        window = list(self.agreements.get(model, ()))
        recent = window[len(window) - min(len(window), self.judged_since_start.get(model, len(window))):]
        trigger = which_trigger(self.cfg.trigger, pending=self.pending.get(model, 0), running=model in self.running,
                                now=self._clock(), last_started=self.last_started.get(model),
                                agreements=recent, golden_accuracy=golden_accuracy)
        return self._start(model, trigger) if trigger else None

    def _follow_teachers(self) -> None:
        """A student whose teacher's production is not the version it last learned from gets
        a job (trigger ``teacher``): whichever way the teacher's production changed (its job,
        a rollout's last step, an operator's promotion or rollback). Once per teacher version:
        a student job the gate rejects is not started again for the same one. Called with
        ``_lock`` held."""
        for m in self.cfg.models:
            if m.distill is None:
                continue
            try:
                teacher = self.registry.production(m.distill.teacher)
                if teacher is None or teacher == self._learned_from(m.name):
                    continue
                self._production_of(m.name)
                if self._in_rollout.get(m.name):
                    # Its version would only wait as a candidate, and learned_from would say this
                    # teacher was followed: the student waits for its own rollout to end.
                    continue
                self._start(m.name, f"teacher {m.distill.teacher} {teacher}")  # records learned_from
            except Exception:  # noqa: BLE001 - one student's storage trouble must not stop the others'
                log.exception("sweep: could not follow %s's teacher", m.name)

    def _learned_from(self, student: str) -> str | None:
        """The teacher version the student's newest job was started for; at first, the one
        its newest version was distilled from, production or not: after a restart (every
        config change is one) a version the gate rejected was retried for the same teacher."""
        if student not in self.learned_from:
            newest = self.registry.versions(student)[-1:]
            source = newest[0].distilled_from if newest else None
            self.learned_from[student] = source["version"] if source else None
        return self.learned_from[student]

    def start(self, model: str, trigger: str = "manual") -> str | None:
        """Start a job now; None if one is already running for this model."""
        with self._lock:
            self._reap()
            return self._start(model, trigger)

    def _start(self, model: str, trigger: str) -> str | None:
        if model in self.running:
            return None
        if self.retiring:
            log.debug("not starting a %s job for %s: this controller is handing over to its successor", trigger, model)
            return None
        other = self.jobs.running(model)  # e.g. a `tuneloop train` beside the server
        if other is not None:
            self.running[model] = other.job_id
            log.info("not starting a %s job for %s: job %s is running", trigger, model, other.job_id)
            return None
        # Everything that may fail before the record is written: a record written first was
        # left "running" with no process behind it, every trigger deferring to it until it
        # was marked lost (a failed run in the metrics and its alert).
        teacher = self.cfg.model(model).distill
        teacher_production = self.registry.production(teacher.teacher) if teacher is not None else None
        if trigger != "manual" and self._clock() - self._launch_failed_at.get(model, float("-inf")) < LAUNCH_RETRY_S:
            return None  # a failing launch is not retried at every feedback record, each with a record of its own
        job = self.jobs.create(model, trigger)
        self._seen_jobs.add(job.job_id)
        try:
            task = self._launch(model, trigger, job)
        except Exception as e:
            self._launch_failed_at[model] = self._clock()
            self.jobs.fail_running(job, f"could not start: {type(e).__name__}: {e}")
            raise
        if teacher is not None:  # any job of a student distils from the teacher's production now
            self.learned_from[model] = teacher_production
        self._counting_from(model, self._clock())
        self.tasks[model] = task
        self.running[model] = job.job_id
        log.info("started retrain job %s for %s (%s)", job.job_id, model, trigger)
        return job.job_id

    def _counting_from(self, model: str, started: float) -> None:
        """Triggers count anew from a job's start: the records arriving from now on count
        towards the next job. A failed job's are not counted again: a job failing for good
        (too little data, a bad seed) then restarted at every sweep; they train with the next
        job, by trigger, schedule or an operator."""
        self.pending[model] = 0
        self.counted[model] = set()
        self.judged_since_start[model] = 0
        self.last_started[model] = started

    def _notice_jobs_started_elsewhere(self, records: list[JobRecord]) -> None:
        """Called with ``_lock`` held, with every job record: a job this controller did not
        start (``tuneloop train`` or ``deploy retrain`` beside it) trained on what the
        triggers were counting, so they count anew from its start, as after a restart (the
        few records between its start and this sweep are left to the next job); a student's
        job learned from its teacher's production of now. Otherwise, once it ended, the
        counts of before it started another job within a sweep, on a handful of new rows."""
        for job in records:
            if job.job_id in self._seen_jobs or job.model not in self._configured:
                continue
            if job.state != "running" and job.heartbeat_at is None:
                continue  # never ran (refused the model's lease, or died at once): it trained on nothing
            self._seen_jobs.add(job.job_id)
            log.info("job %s of %s started elsewhere (%s): the triggers count from its start", job.job_id,
                     job.model, job.trigger)
            # Its host's clock, held to this one's: ahead, it would hold the schedule back.
            self._counting_from(job.model, min(datetime.fromisoformat(job.created_at).timestamp(), self._clock()))
            teacher = self.cfg.model(job.model).distill
            if teacher is not None:
                self.learned_from[job.model] = self.registry.production(teacher.teacher)
            if job.state == "running":
                self.running.setdefault(job.model, job.job_id)

    def busy(self) -> bool:
        """Whether a job this controller started is still running."""
        with self._lock:
            self._reap()
            return bool(self.tasks)

    def status(self) -> dict:
        with self._lock:
            self._reap()
            return {"pending": dict(self.pending), "running": sorted(self.running), "retiring": self.retiring,
                    "online_accuracy": {m: online_accuracy(list(a)) for m, a in self.agreements.items()}}


def _health_reader(metrics_dir: str | None) -> Callable[[str], dict]:
    """The versions' serving counts, from every node's replica metric files."""

    def read(model: str) -> dict:
        if not metrics_dir:
            return {}
        with cluster_metric_files(metrics_dir, complete=True) as files:  # a partial one is no baseline
            return version_health(files, model)

    return read


@ray.remote(num_cpus=0, max_concurrency=4)
class RetrainController(Retrainer):
    """The Retrainer as the named Ray actor the ingress finds (``names.controller_name``).

    Started detached by its keeper (control/apps.py), so it outlives the keeper's replica:
    a keeper that crashed is replaced by one that ``adopt``s the same controller, and its
    running job goes on. Its keeper, stopping, ``retire``s it: it starts no new job, waits
    for its own to end (the job is its task: it would die with it), then leaves; unless a
    new keeper adopted it meanwhile (a rolling update of the same config)."""

    def __init__(self, config: dict, metrics_dir: str | None = None):
        super().__init__(**Retrainer.parts_from_config(config))
        self._owner: str | None = None
        storage = Storage(self.cfg.storage.root)
        problem = storage.conditional_write_problem()
        if problem:  # the deployment fails to start, saying why, rather than lose updates
            raise RuntimeError(problem)
        tasks = model_tasks(self.cfg.models)
        self.rollouts = RolloutDriver(self.cfg, self.registry, FeedbackStore(storage, self.cfg.storage.journal_path(), tasks),
                                      PredictionLog(storage, tasks, root=SHADOW_ROOT), _health_reader(metrics_dir))
        threading.Thread(target=self._drive_rollouts, name="rollouts", daemon=True).start()

    def _drive_rollouts(self) -> None:
        """Every rollout.evaluate_every_s, each model's rollout moves on its evidence
        (control/rollout_driver.py); not while handing over to a successor."""
        while True:
            time.sleep(self.cfg.rollout.evaluate_every_s)
            if not self.retiring:
                self.rollouts.look_all()

    def adopt(self, owner: str) -> None:
        with self._lock:
            self._owner, self.retiring = owner, False

    def retire(self, owner: str) -> bool:
        """Called by keeper ``owner`` as it stops; False (and nothing done) if another
        keeper owns this controller now. Returns at once; the leaving happens in a thread."""
        with self._lock:
            if owner != self._owner:
                return False
            self.retiring = True
        threading.Thread(target=self._leave_when_idle, args=(owner,), name="retire", daemon=True).start()
        return True

    def _leave_when_idle(self, owner: str, every_s: float = 2.0) -> None:
        while True:
            try:
                if not self.busy():
                    break
            except Exception:  # noqa: BLE001 - storage trouble: this thread must not die and the actor stay
                log.exception("retiring controller: could not read its job's state; trying again")
            time.sleep(every_s)
        with self._lock:
            if not self.retiring or owner != self._owner:
                return  # adopted again while its job ran
        log.info("retrain controller retired (its keeper stopped)")
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

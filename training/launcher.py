"""Launch one fine-tuning job: its data (``job_data.py``: fresh feedback, replay, golden
set), a TorchTrainer with DeepSpeed workers that read its tables from Ray's object store,
then the gate, the registry and (if accepted, and production is still the version the job
started from) production.

Starts from the current production weights (the base model for v1) and trains on the
feedback that arrived since production was trained, plus a replay sample of the seed and
of earlier feedback, so a new version learns what is new without forgetting the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.train import LoggingConfig, RunConfig, ScalingConfig, WorkerGroupError
from ray.train.torch import TorchTrainer

from tuneloop.core.config import GateConfig, TrainingConfig, TuneloopConfig, cluster_to_join
from tuneloop.core.evaluation import EvalMetrics
from tuneloop.core.gate import Evidence, GateDecision, TeacherEvidence, decide
from tuneloop.core.model_source import local_config
from tuneloop.core.names import INGRESS_APP, INGRESS_DEPLOYMENT, model_app_name, running_replicas
from tuneloop.core.resources import DATA_CPUS, training_shortfall
from tuneloop.core.serving_time import JobMoments, rollout_complete, serving_time
from tuneloop.core.tasks import Task, model_tasks
from tuneloop.store.jobs import HEARTBEAT_EVERY_S, Heartbeat, JobLost, JobRecord, JobRunning, JobStore, hand_over, take_lease
from tuneloop.store.feedback_store import FeedbackStore
from tuneloop.store.documents import iso_time
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage
from tuneloop.training.distill import teacher_of, with_teacher_logits
from tuneloop.training.job_data import TRANSFER, JobData, assemble, with_training_columns
from tuneloop.training.loop import train_loop_per_worker
from tuneloop.training.model_files import ModelFiles
from tuneloop.training.recipe import layer_problem, startup_parts, training_speed

log = logging.getLogger(__name__)
KEEP_TRAIN_RUNS = 2  # Ray Train run folders kept per model (each holds a full checkpoint)
ROLLOUT_WAIT_S = 120.0  # how long a job waits for every replica to serve its promoted version


class ResourcesUnavailable(RuntimeError):
    """The job's workers cannot be scheduled beside what runs; the message says what to change."""


# (config, registry, model, version) -> the version's manifest with its optimized artifacts
Optimizer = Callable[[TuneloopConfig, Registry, str, str], Manifest]


@dataclass
class TrainingOutcome:
    job: JobRecord
    manifest: Manifest | None
    # Why the job never started (another job of the model holds its lease), for a job this
    # call created: its record is removed, as a refusal is no failed job to alert on.
    refused: str | None = None


SANITY_ROWS = 256


def _data_line(summary: dict) -> str:
    """What a job trains and is judged on, in one line (the manifest keeps the whole summary)."""
    fb, replay = summary["feedback"], summary["replay"]
    held = summary["quarantine"].get("held_rows", 0)
    transfer = (summary.get("transfer") or {}).get("rows")
    return (f"{summary['train_rows']} rows to train ({fb['trained_rows']} fresh feedback, {replay['rows']} replayed"
            f"{'' if summary.get('seed') is None else ' or seed'}"
            f"{f', {transfer} transfer texts for the teacher to label' if transfer else ''}), golden set {summary['golden']['rows']}, "
            f"{fb['kept_back_rows']} fresh kept back for the gate, {summary['validation']['rows']} for early stopping"
            + (f", {held} held by the quarantine" if held else ""))


def _job_tables(task: Task, data: JobData) -> dict[str, pa.Table]:
    """The tables the workers read: ``train`` (split among them) and the evaluation sets,
    each with a ``row`` number (each worker scores all of one; empty ones are left out)."""
    sets = {"train": with_training_columns(task, data.train)}
    # Without a golden set or kept-back rows, some training rows are scored anyway: the gate's
    # check for finite outputs otherwise looked at nothing, and passed weights gone to NaN.
    sanity = None
    if not (data.golden.num_rows or data.fresh_eval.num_rows):
        is_transfer = pc.fill_null(pc.equal(data.train.column("source"), TRANSFER), False)
        sanity = data.train.filter(pc.invert(is_transfer)).slice(0, SANITY_ROWS)
    for name, table in (("golden", data.golden), ("fresh", data.fresh_eval), ("validation", data.validation),
                        ("sanity", sanity)):
        if table is not None and table.num_rows:
            sets[name] = with_training_columns(task, table).append_column(
                "row", pa.array(range(table.num_rows), pa.int64()))
    return sets


def _wait_for_resources(tcfg: TrainingConfig, autoscaled: bool) -> None:
    """Fail fast, saying what to change, when the workers cannot be scheduled: Ray Train's
    worker group would otherwise wait for its CPUs forever while the job shows running. CPUs
    held by a job or replica that is ending are waited for, up to ``resource_wait_s``. On a
    cluster that may autoscale (``autoscaled``), resources it lacks altogether are asked of
    its autoscaler and waited for too: a GPU node takes minutes to join."""
    per_worker = _per_worker(tcfg)
    if autoscaled:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[per_worker] * tcfg.num_workers + [{"CPU": DATA_CPUS}])
    deadline = time.monotonic() + tcfg.resource_wait_s
    try:
        while True:
            short = training_shortfall(tcfg.num_workers, per_worker, ray.cluster_resources(),
                                       ray.available_resources())
            if short is None:
                return
            waitable = autoscaled or " free " in short
            if not waitable or time.monotonic() > deadline:
                raise ResourcesUnavailable(short)
            time.sleep(1.0)
    finally:
        if autoscaled:
            request_resources(bundles=[])  # the workers' own demand keeps the nodes from now on


def worker_error(e: WorkerGroupError) -> ValueError | JobLost | None:
    """The ValueError every failed worker raised (the loop's own checks: a tokenizer with
    neither a pad nor an end token, no output layer to find), or the JobLost one raised (its
    record was marked lost: the others may have died waiting for it), as itself: Ray Train
    wraps it in the worker's traceback, which the job's error then carried instead of the
    message. None for anything else, a bug, whose traceback is what a user needs."""
    # Ray Train 2.60 keeps the worker's exception in UserExceptionWithTraceback._base_exc.
    causes = [getattr(f, "_base_exc", f) for f in e.worker_failures.values()]
    lost = [c for c in causes if isinstance(c, JobLost)]
    if lost:
        return JobLost(str(lost[0]))
    if causes and all(isinstance(c, ValueError) for c in causes):
        return ValueError(str(causes[0]))
    return None


def _fit(trainer: TorchTrainer) -> Any:
    """``trainer.fit()``, with Ctrl-C raised as KeyboardInterrupt and the process's own SIGINT
    handler back afterwards. Ray Train 2.60 installs a handler for the run that aborts it and
    then exits 0 (SystemExit): an interrupted `tuneloop train` ended with exit 0 and its job
    record still "running", until marked lost a minute later. And it leaves that handler in
    place, so Ctrl-C during the gate, publishing or the rollout wait did nothing."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except SystemExit:  # only Ray Train's Ctrl-C handler exits from inside fit()
        raise KeyboardInterrupt from None
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _per_worker(tcfg: TrainingConfig) -> dict[str, float]:
    """What each training worker asks Ray for."""
    gpus = {"GPU": tcfg.gpus_per_worker} if tcfg.use_gpu else {}
    return {"CPU": tcfg.cpus_per_worker, **gpus, **tcfg.resources_per_worker}


_HANDLE_LOOP: asyncio.AbstractEventLoop | None = None


def _handle_loop() -> asyncio.AbstractEventLoop:
    """An event loop that runs for the rest of the process, for Serve handles: Serve binds
    the process's shared long-poll client to the first loop a handle runs on, and one that
    stopped (asyncio.run's) made it log an ERROR at the next update after every job."""
    global _HANDLE_LOOP
    if _HANDLE_LOOP is None:
        _HANDLE_LOOP = asyncio.new_event_loop()
        threading.Thread(target=_HANDLE_LOOP.run_forever, name="tuneloop-serve-handles", daemon=True).start()
    return _HANDLE_LOOP


def _settle_feedback(feedback: FeedbackStore) -> None:
    """Bring every acknowledged record into Parquet before the snapshot: the live writer
    (the ingress, if tuneloop is serving) compacts its journal on request, and segments
    whose writer died are recovered here."""
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    async def ask_the_ingress() -> int:
        # From inside an event loop: in Serve's throughput-optimized mode a handle's router
        # runs on the caller's loop, and a blocking .result() outside one is refused. A
        # handle of its own, shut down on this loop: serve.get_deployment_handle's would stay
        # cached with its router on this loop once it is closed, and a later serve.shutdown()
        # in this process fails on it ("Event loop is closed").
        ingress = DeploymentHandle(INGRESS_DEPLOYMENT, INGRESS_APP)
        try:
            return await asyncio.wait_for(ingress.compact_feedback.remote(), 60)
        finally:
            await ingress.shutdown_async()

    try:
        # Only where tuneloop's ingress runs: a handle to an absent app waits out its timeout.
        if INGRESS_APP in serve.status().applications:
            asyncio.run_coroutine_threadsafe(ask_the_ingress(), _handle_loop()).result(70)
        elif "://" in feedback.storage.uri:
            # A Ray cluster of its own (a KubeRay RayJob): the serving cluster's journal is
            # out of reach; what it has not compacted yet waits for the next job.
            log.warning("no tuneloop ingress in this Ray cluster: feedback the serving cluster has not compacted "
                        "yet (at most feedback.compact_interval_s old) is left to the next job")
    except Exception as e:  # noqa: BLE001 - not serving (a CLI job), or the ingress is restarting
        log.debug("no live feedback writer to compact (%s); recovering the journal here", type(e).__name__)
    feedback.open_writer()  # recovers dead writers' segments
    feedback.close()


def _check_layers(tcfg: TrainingConfig, init_path: str, student_layers: int | None) -> None:
    """Fail now, before Ray Train starts, on layers the model does not have (``layer_problem``)."""
    config = local_config(init_path)
    if config is None:
        return  # the workers' own check still stands
    problem = layer_problem(config, tcfg.freeze_layers, tcfg.feature_extraction, student_layers)
    if problem:
        raise ValueError(problem)


def run_training(cfg: TuneloopConfig, model: str, trigger: str = "manual", job: JobRecord | None = None,
                 optimize: Optimizer | None = None) -> TrainingOutcome:
    """Run one job to the end; never raises for a failed job (it is recorded as failed).

    ``optimize`` (the control layer's ``serving.optimize.optimize_version``) builds an
    accepted version's optimized artifacts before it is handed over to serving, when
    ``optimize.enabled``; its failure leaves the version to serve on PyTorch.

    The process holds the model's lease for the whole run (a second job of the model fails
    at once, naming this one) and beats the job's heartbeat, so that if it dies the job is
    reported failed and the lease goes to the next one (on a local root the kernel frees its
    lock; on an object store the next job takes a lease whose job was marked lost).
    """
    storage = Storage(cfg.storage.root)
    registry, jobs = Registry(storage), JobStore(storage)
    created_here = job is None
    job = job or jobs.create(model, trigger)
    job.pid, job.host = os.getpid(), socket.gethostname()
    job.ray_node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    try:
        lease = take_lease(storage, jobs, job)
    except Exception as e:  # noqa: BLE001 - JobRunning, or the lock file could not be opened
        error = e.message if isinstance(e, JobRunning) else f"{type(e).__name__}: {e}"
        job.state, job.error, job.finished_at = "failed", error, jobs.now()
        if created_here and isinstance(e, JobRunning):
            # `tuneloop train` beside a job that took the lease just after its own check: it
            # left a failed job on record, which the failed-jobs alert took for a failed run.
            log.error("not started: %s", error)
            jobs.discard(job)
            return TrainingOutcome(job, None, refused=error)
        log.error("job %s not started: %s", job.job_id, error)
        jobs.save(job)
        return TrainingOutcome(job, None)
    heartbeat = Heartbeat(jobs, job)
    try:
        heartbeat.start()
        # Marked lost before its first beat (its process started late): it trained to the end,
        # to be refused at publishing.
        jobs.check_still_running(job.job_id)
        manifest = _train(cfg, model, job, storage, registry, optimize)
        return TrainingOutcome(job, manifest)
    except KeyboardInterrupt:  # the operator's Ctrl-C: recorded as such, then passed on
        if job.state == "running":
            published = f" (its version {job.version} was published, not handed over)" if job.version else ""
            log.warning("job %s interrupted (Ctrl-C); recorded as failed%s", job.job_id, published)
            job.state, job.error = "failed", f"interrupted: Ctrl-C in the process that ran the job{published}"
        else:  # handed over already (waiting for the replicas to switch): what it did stands
            log.warning("job %s interrupted (Ctrl-C) after it %s; recorded as such", job.job_id, job.state)
        raise
    except Exception as e:  # noqa: BLE001 - the job record carries the failure
        # The data, the config or the cluster (ValueError, ResourcesUnavailable): its message
        # says it; anything else is a bug, with its traceback.
        expected = isinstance(e, ValueError | ResourcesUnavailable | JobLost)
        log.error("job %s failed: %s", job.job_id, e if expected else traceback.format_exc())
        if expected:
            log.debug("job %s failed: %s", job.job_id, traceback.format_exc())
        job.state = "failed"
        job.error = f"{type(e).__name__}: {e}"
        return TrainingOutcome(job, None)
    finally:
        heartbeat.stop()
        job.finished_at = jobs.now()
        try:
            jobs.save(job)
        finally:  # after the final record (the next job finds this one finished), or without it
            lease.release()


def _train(cfg: TuneloopConfig, model: str, job: JobRecord, storage: Storage, registry: Registry,
           optimize: Optimizer | None) -> Manifest:
    """Train, gate and publish; promote if accepted and production is still the parent."""
    tasks = model_tasks(cfg.models)
    feedback = FeedbackStore(storage, cfg.storage.journal_path(), tasks)
    mcfg, task = cfg.model(model), tasks[model]
    tcfg = cfg.training_for(model)
    _settle_feedback(feedback)
    feedback.merge_closed_days(model)  # under this job's lease
    parent = registry.production(model)
    teacher = teacher_of(cfg, registry, model)
    # init_files: what the workers fetch on their own nodes; init_path: this node's copy.
    if parent:
        init_files = ModelFiles.of_version(registry, model, parent)
    elif teacher is not None and teacher.student_layers:
        init_files = teacher.files  # cut to student_layers in the workers
    else:
        init_files = ModelFiles(base_model=mcfg.base_model)
    init_path = init_files.local_path()
    _check_layers(tcfg, init_path, teacher.student_layers if teacher is not None and not parent else None)
    if tcfg.feature_extraction and tcfg.freeze_layers:
        log.warning("job %s: feature_extraction freezes the whole encoder; freeze_layers %d has no effect",
                    job.job_id, tcfg.freeze_layers)
    parent_manifest = registry.manifest(model, parent) if parent else None
    data = assemble(task, mcfg, tcfg, registry, feedback, parent_manifest, cfg.quarantine,
                    teacher=cfg.model(teacher.model) if teacher else None)
    if data.summary["quarantine"]["flagged"]:
        log.warning("job %s: quarantined feedback keys of %s: %s", job.job_id, model,
                    data.summary["quarantine"]["flagged"])
    if data.train.num_rows < tcfg.num_workers:  # a worker without a row trains nothing, and says nothing
        raise ValueError(f"{data.train.num_rows} training row(s) for {tcfg.num_workers} workers: each needs one at "
                         "least; add seed data or feedback, or lower training.num_workers")
    tables = _job_tables(task, data)
    log.info("job %s: %s from %s: %s", job.job_id, model, parent or mcfg.starts_from(), _data_line(data.summary))
    # A cluster joined by address may autoscale; the local Ray `tuneloop run` starts cannot.
    _wait_for_resources(tcfg, autoscaled=cluster_to_join(cfg.ray.address, os.environ.get("RAY_ADDRESS")) is not None)
    training_started = _now()  # a student's teacher scoring its rows is training, not queueing
    if teacher is not None:
        tables["train"] = with_teacher_logits(tables["train"], teacher, task, tcfg.max_length, tcfg.use_gpu,
                                              tcfg.cpus_per_worker, tcfg.gpus_per_worker)
        log.info("job %s: teacher %s %s scored %d rows in %.1f s (%s)", job.job_id, teacher.model, teacher.version,
                 data.train.num_rows, teacher.scoring_s, teacher.scoring_dtype)
    jobs = JobStore(storage)
    jobs.check_still_running(job.job_id)  # marked lost during the teacher's scoring or the wait for resources
    run_started = _now()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            **tcfg.model_dump(),
            "init_files": init_files.model_dump(),
            "task": mcfg.task,
            "labels": mcfg.labels,
            "task_options": {k: getattr(mcfg, k) for k in task.options},
            "has_parent": parent is not None,
            # The gate judges what will serve: texts read as the replicas read them (cut, or in windows).
            "eval_max_length": cfg.serving.max_length,
            "train_rows": data.train.num_rows,
            # The workers stop once the job's record no longer says running (marked lost).
            "job": {"storage": storage.uri if not storage.is_local else storage.root, "job_id": job.job_id,
                    "check_every_s": HEARTBEAT_EVERY_S},
            # Object references, not the tables: each worker reads them from the object store.
            "tables": {name: ray.put(table) for name, table in tables.items()},
            "distill": teacher.loop_config(parent is None) if teacher else None,
        },
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu, resources_per_worker=_per_worker(tcfg)
        ),
        run_config=RunConfig(
            name=f"{model}-{job.job_id}", storage_path=storage.path("train_runs"), storage_filesystem=storage.fs,
            # Ray Train's own info lines (each report's whole metrics dict, every checkpoint's
            # path: 40 lines a job) are in its log files; the console gets the job's progress.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        result = _fit(trainer)
    except WorkerGroupError as e:
        raise worker_error(e) or e from None
    training_ended = _now()
    report = result.metrics
    gate, metrics, parent_metrics = _gate(task, cfg.gate, report, teacher.evidence() if teacher else None, data.golden)
    gated = _now()
    manifest = Manifest(
        version="pending",
        model=model,
        parent=parent,
        base_model=mcfg.starts_from(),
        task=mcfg.task,
        labels=mcfg.labels,
        # A CPU job's workers held no GPU, whatever gpus_per_worker's default says.
        training={**tcfg.model_dump(), "gpus_per_worker": tcfg.gpus_per_worker if tcfg.use_gpu else 0,
                  "steps": report["steps"], **report["recipe"],
                  "speed": _speed(report, run_started)},
        data={**data.summary, "fresh_eval": _fresh_numbers(gate)},
        metrics=metrics,
        parent_metrics=parent_metrics,
        gate=gate,
        status="accepted" if gate.accepted else "rejected",
        job_id=job.job_id,
        distilled_from=teacher.record(parent is None) if teacher else None,
    )
    trained_on = data.train.select(["source", "feedback_id", "prediction_id", "key_id", "text", *task.target_columns])
    jobs.check_still_running(job.job_id)  # marked lost meanwhile: the model's next job may be running
    with result.checkpoint.as_directory() as ckpt_dir:
        manifest = registry.publish(model, ckpt_dir, manifest,
                                    tables={"trained_on": trained_on, "reservoir": data.reservoir, "golden": data.golden,
                                            "held": data.held, "answered": data.answered})
    published = _now()
    job.version = manifest.version
    job.metrics = metrics.model_dump()
    job.gate = gate
    optimized = None
    if gate.accepted and optimize is not None and cfg.builds_artifacts():
        try:
            manifest = optimize(cfg, registry, model, manifest.version)
        except Exception:  # noqa: BLE001 - the version still serves, on PyTorch
            log.exception("job %s: optimizing %s failed; it serves on PyTorch", job.job_id, manifest.version)
        optimized = _now()
    if gate.accepted:
        jobs.check_still_running(job.job_id)  # optimizing takes minutes
        hand_over(registry, job, manifest.version, parent, gate.reason, cfg.rollout)  # sets job.promoted
        job.state = "succeeded"
    else:
        job.state, job.promoted = "rejected", False
        job.message = f"{manifest.version} rejected by the gate: {gate.reason}"
    _prune_train_runs(storage, model)
    moments = JobMoments(created=datetime.fromisoformat(job.created_at), training_started=training_started,
                         training_ended=training_ended, evaluation_s=float(report.get("evaluation_s", 0.0)),
                         gated=gated, published=published, optimized=optimized)
    try:  # the version is published (and maybe serving): timing it must not fail the job
        serving_all = None
        if job.promoted and parent is not None and registry.switches(model, parent):
            # Replicas served the parent from this registry: time the switch to the new version.
            serving_all = _wait_for_rollout(registry, model, manifest.version, cfg.serving.reload_interval_s)
        job.serving_time = serving_time(_newest_feedback(data.summary), moments, serving_all)
        manifest = registry.record_serving_time(model, manifest.version, job.serving_time)
    except Exception as e:  # noqa: BLE001 - Serve or storage trouble after the decision
        log.warning("job %s: %s's feedback-to-serving time not recorded: %s", job.job_id, manifest.version, e)
    log.info("job %s: %s %s (%s); feedback to serving: %s", job.job_id, manifest.version, job.state, job.message,
             job.serving_time.describe() if job.serving_time else "not recorded")
    return manifest


def _speed(report: dict[str, Any], run_started: datetime) -> dict[str, Any]:
    """The run's samples/s per epoch and its start-up: from its start here to the first
    batch in the workers, in parts (both wall clocks of this machine or of nodes kept in sync)."""
    return training_speed([tuple(e) for e in report["epochs"]],
                          startup_parts(run_started.timestamp(), report["startup_marks"]))


def _now() -> datetime:
    return datetime.now(UTC)


def _newest_feedback(summary: dict[str, Any]) -> datetime | None:
    """The newest feedback the job trained on (its watermark), if it trained on any new."""
    if not summary["feedback"]["trained_rows"] or not summary.get("watermark"):
        return None
    return datetime.fromisoformat(summary["watermark"]["created_at"])


def _wait_for_rollout(registry: Registry, model: str, version: str, reload_interval_s: float) -> datetime | None:
    """When every running replica of the model serves ``version`` (each notes the switch in
    the registry), waiting up to ROLLOUT_WAIT_S; None when the model is not being served
    here (no `tuneloop run` beside a CLI job) or the rollout did not finish in time."""
    from ray import serve

    wait_s = max(ROLLOUT_WAIT_S, 10 * reload_interval_s)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            apps = serve.status().applications
        except Exception as e:  # noqa: BLE001 - Serve is not running here
            log.info("%s %s: not served here (%s); no rollout to time", model, version, type(e).__name__)
            return None
        if model_app_name(model) not in apps:
            return None
        done = rollout_complete(running_replicas(apps, model), registry.switches(model, version))
        if done is not None:
            return done
        if time.monotonic() > deadline:
            log.warning("%s %s: not every replica serves it after %.0f s; rollout time left unknown",
                        model, version, wait_s)
            return None
        time.sleep(min(1.0, reload_interval_s))


def _prune_train_runs(storage: Storage, model: str, keep: int = KEEP_TRAIN_RUNS) -> None:
    """Ray Train's run folders hold a full checkpoint each, and the registry holds the
    published copy: keep the newest few of a model (to debug a job), delete the rest. After
    the version is handed over, and never failing the job: a listing error here failed an
    accepted job before its version was handed over."""
    mine = re.compile(rf"^{re.escape(model)}-([0-9a-f]{{16}})$")  # <model>-<job id>: not model "a-b"'s for "a"
    jobs = JobStore(storage)

    def started(run) -> str:
        """When its job started, by the job's record: an object store gives a folder no
        modification time, and its runs were kept in the listing's order, not the newest."""
        try:
            job = jobs.get(mine.match(run.base_name).group(1))
        except Exception:  # noqa: BLE001 - a record cut or out of reach: the folder's own time
            job = None
        return job.created_at if job else iso_time(datetime.fromtimestamp((run.mtime_ns or 0) / 1e9, UTC))

    try:
        runs = sorted((i for i in storage.list_dir("train_runs") if mine.match(i.base_name)), key=started)
    except OSError as e:
        log.warning("could not list the train runs to prune: %s", e)
        return
    for old in runs[:-keep] if keep else runs:
        try:
            storage.delete_dir(f"train_runs/{old.base_name}")
        except OSError as e:  # another job's run being written, or already gone
            log.warning("could not prune train run %s: %s", old.base_name, e)


def _gate(task: Task, rules: GateConfig, report: dict, teacher: TeacherEvidence | None,
          golden_table: pa.Table | None = None) -> tuple[GateDecision, EvalMetrics, EvalMetrics | None]:
    """The gate on what the workers measured: the golden set (the version's metrics) and the
    kept-back fresh rows, candidate and production paired by row; with one class a text,
    each golden row's class (``golden_table``'s, by row number)."""
    candidate, parent = report["candidate"], report["parent"]
    empty = {"metrics": EvalMetrics(accuracy=0, precision=0, recall=0, f1=0, eval_rows=0).model_dump(), "right": []}
    golden = EvalMetrics.model_validate(candidate.get("golden", empty)["metrics"])
    parent_golden = EvalMetrics.model_validate(parent.get("golden", empty)["metrics"]) if parent else None
    def paired(name: str) -> tuple[list[int], list[bool], list[bool]]:
        """The rows both scored, and whether the candidate / production answered each right."""
        ours = dict(candidate.get(name, empty)["right"])
        theirs = dict(parent.get(name, empty)["right"]) if parent else {}
        rows = sorted(set(ours) & set(theirs))
        return rows, [ours[r] for r in rows], [theirs[r] for r in rows]

    (_, fresh_ours, fresh_theirs), (golden_rows, golden_ours, golden_theirs) = paired("fresh"), paired("golden")
    classes = []
    if golden_table is not None and task.target_columns == ("label",) and golden_rows:
        labels = golden_table.column("label").to_pylist()
        classes = [labels[r] for r in golden_rows]
    evidence = Evidence(metric=task.gate_metric, golden=golden, parent_golden=parent_golden,
                        fresh_candidate=fresh_ours, fresh_parent=fresh_theirs,
                        golden_candidate=golden_ours, golden_parent=golden_theirs, golden_classes=classes,
                        finite=all(e["finite"] for e in candidate.values()), teacher=teacher)
    return decide(evidence, rules), golden, parent_golden


def _fresh_numbers(gate: GateDecision) -> dict[str, Any]:
    return next((c.numbers for c in gate.checks if c.name == "fresh"), {})

"""Launch one fine-tuning job: data through Ray Data, a TorchTrainer with DeepSpeed workers,
then the gate, the registry and (if accepted, and production is still the version the job
started from) production.

Starts from the current production weights (the base model for v1) and trains on the seed
dataset plus all feedback so far, so a new version keeps what earlier data taught.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import traceback
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from pyarrow import csv as pacsv
from ray.data.expressions import col
from ray.train import DataConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from tuneloop.core.config import ModelConfig, TuneloopConfig
from tuneloop.core.feedback_stats import superseded
from tuneloop.core.gate import evaluate_gate
from tuneloop.store.jobs import Heartbeat, JobRecord, JobRunning, JobStore, promote_or_wait, take_lease
from tuneloop.core.model_source import resolve_model_source
from tuneloop.core.tasks import Task, model_tasks
from tuneloop.store.records import FeedbackStore, arrow_type
from tuneloop.core.evaluation import EvalMetrics
from tuneloop.store.registry import Manifest, Registry
from tuneloop.store.storage import Storage
from tuneloop.core.names import INGRESS_APP, INGRESS_DEPLOYMENT
from tuneloop.training.data import file_sha256, is_held_out, seed_format
from tuneloop.training.loop import train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class TrainingOutcome:
    job: JobRecord
    manifest: Manifest | None


def _read_seed(path: str, task: Task) -> ray.data.Dataset:
    columns = ["text", *task.target_columns]
    fmt = seed_format(path)
    if fmt in (".tsv", ".csv"):
        parse = pacsv.ParseOptions(delimiter="\t" if fmt == ".tsv" else ",", quote_char=False if fmt == ".tsv" else '"')
        convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns})
        ds = ray.data.read_csv(path, parse_options=parse, convert_options=convert)
    elif fmt == ".jsonl":
        ds = ray.data.read_json(path)
    else:
        ds = ray.data.read_parquet(path)
    return ds.select_columns(columns)


def _prepare(batch: pa.Table, task: Task, eval_fraction: float) -> pa.Table:
    """The task's training targets and the held-out flag; a target outside the model's
    labels fails the job, naming it."""
    texts = batch.column("text").cast(pa.string()).to_pylist()
    targets = task.training_targets({c: batch.column(c).to_pylist() for c in task.target_columns})
    return pa.table(
        {
            "text": pa.array(texts, pa.string()),
            **{c: pa.array(targets[c], arrow_type(t)) for c, t in task.training_columns.items()},
            "held_out": pa.array([is_held_out(t, eval_fraction) for t in texts], pa.bool_()),
        }
    )


def _without_ids(batch: pa.Table, ids: list[str]) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch["feedback_id"], value_set=pa.array(ids))))


def _datasets(
    mcfg: ModelConfig, task: Task, storage: Storage, feedback: FeedbackStore, feedback_files: list[str],
    eval_fraction: float,
) -> tuple[dict[str, ray.data.Dataset], dict[str, Any]]:
    ray.data.DataContext.get_current().enable_progress_bars = False  # they flood the server's log
    parts, summary = [], {}
    if mcfg.seed_dataset:
        parts.append(_read_seed(mcfg.seed_dataset, task))
        summary["seed"] = {"path": mcfg.seed_dataset, "sha256": file_sha256(mcfg.seed_dataset)}
    dropped: list[str] = []
    if feedback_files:
        # Latest wins (cluster/feedback_stats.py): older feedback on a prediction is left out.
        ids = feedback.read(mcfg.name, feedback_files).select(["feedback_id", "prediction_id", "created_at"])
        dropped = sorted(superseded(ids.to_pylist()))
        rows = ray.data.read_parquet(
            [storage.path(f) for f in feedback_files], filesystem=storage.fs, partitioning=None
        )
        if dropped:
            rows = rows.map_batches(_without_ids, batch_format="pyarrow", fn_kwargs={"ids": dropped})
        parts.append(rows.select_columns(["text", *task.target_columns]))
    if not parts:
        raise ValueError(f"model {mcfg.name!r} has no seed dataset and no feedback to train on")
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    prepared = ds.map_batches(
        _prepare, batch_format="pyarrow", fn_kwargs={"task": task, "eval_fraction": eval_fraction}
    ).materialize()
    train = prepared.filter(expr=col("held_out") == False).materialize()  # noqa: E712 - an expression
    held_out = prepared.filter(expr=col("held_out") == True).materialize()  # noqa: E712
    summary["feedback"] = {"files": feedback_files, "rows": feedback.count_rows(feedback_files),
                           "superseded": len(dropped)}
    summary["train_rows"] = train.count()
    summary["eval_rows"] = held_out.count()
    summary["total_rows"] = summary["train_rows"] + summary["eval_rows"]
    if summary["train_rows"] == 0 or summary["eval_rows"] == 0:
        raise ValueError(f"need rows in both splits, got {summary['train_rows']} train and {summary['eval_rows']} held out")
    return {"train": train, "eval": held_out}, summary


def _settle_feedback(feedback: FeedbackStore) -> None:
    """Bring every acknowledged record into Parquet before the snapshot: the live writer
    (the ingress, if tuneloop is serving) compacts its journal on request, and segments
    whose writer died are recovered here."""
    from ray import serve

    async def ask_the_ingress() -> int:
        # From inside an event loop: in Serve's throughput-optimized mode a handle's router
        # runs on the caller's loop, and a blocking .result() outside one is refused.
        ingress = serve.get_deployment_handle(INGRESS_DEPLOYMENT, INGRESS_APP)
        return await asyncio.wait_for(ingress.compact_feedback.remote(), 60)

    try:
        # Only where tuneloop's ingress runs: a handle to an absent app waits out its timeout.
        if INGRESS_APP in serve.status().applications:
            asyncio.run(ask_the_ingress())
    except Exception as e:  # noqa: BLE001 - not serving (a CLI job), or the ingress is restarting
        log.info("no live feedback writer to compact (%s); recovering the journal here", type(e).__name__)
    feedback.open_writer()  # recovers dead writers' segments
    feedback.close()


def run_training(cfg: TuneloopConfig, model: str, trigger: str = "manual", job: JobRecord | None = None) -> TrainingOutcome:
    """Run one job to the end; never raises for a failed job (it is recorded as failed).

    The process holds the model's lease for the whole run (a second job of the model fails
    at once, naming this one) and beats the job's heartbeat, so that if it dies the job is
    reported failed and the kernel frees the lease for the next one.
    """
    storage = Storage(cfg.storage.root)
    registry, jobs = Registry(storage), JobStore(storage)
    job = job or jobs.create(model, trigger)
    job.pid, job.host = os.getpid(), socket.gethostname()
    try:
        lease = take_lease(storage, jobs, job)
    except Exception as e:  # noqa: BLE001 - JobRunning, or the lock file could not be opened
        error = e.message if isinstance(e, JobRunning) else f"{type(e).__name__}: {e}"
        log.error("job %s not started: %s", job.job_id, error)
        job.state, job.error, job.finished_at = "failed", error, jobs.now()
        jobs.save(job)
        return TrainingOutcome(job, None)
    heartbeat = Heartbeat(jobs, job)
    try:
        heartbeat.start()
        manifest = _train(cfg, model, job, storage, registry)
        return TrainingOutcome(job, manifest)
    except Exception as e:  # noqa: BLE001 - the job record carries the failure
        log.error("job %s failed: %s", job.job_id, traceback.format_exc())
        job.state = "failed"
        job.error = f"{type(e).__name__}: {e}"
        return TrainingOutcome(job, None)
    finally:
        heartbeat.stop()
        job.finished_at = jobs.now()
        jobs.save(job)
        if lease is not None:
            lease.release()  # after the final record: the next job finds this one finished


def _train(cfg: TuneloopConfig, model: str, job: JobRecord, storage: Storage, registry: Registry) -> Manifest:
    """Train, gate and publish; promote if accepted and production is still the parent."""
    tasks = model_tasks(cfg.models)
    feedback = FeedbackStore(storage, cfg.storage.journal_path(), tasks)
    mcfg, task = cfg.model(model), tasks[model]
    tcfg = cfg.training
    _settle_feedback(feedback)
    parent = registry.production(model)
    init_path = registry.local_path(model, parent) if parent else resolve_model_source(mcfg.base_model)
    feedback_files = feedback.files(model)  # the snapshot this job trains on
    datasets, data = _datasets(mcfg, task, storage, feedback, feedback_files, tcfg.eval_fraction)
    log.info("job %s: %s from %s, %s", job.job_id, model, parent or mcfg.base_model, data)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            **tcfg.model_dump(),
            "init_path": init_path,
            "task": mcfg.task,
            "labels": mcfg.labels,
            "has_parent": parent is not None,
            "train_rows": data["train_rows"],
        },
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu, resources_per_worker={"CPU": 1}
        ),
        run_config=RunConfig(
            name=f"{model}-{job.job_id}", storage_path=storage.path("train_runs"), storage_filesystem=storage.fs
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    report = result.metrics
    metrics = EvalMetrics.model_validate(report["metrics"])
    parent_metrics = EvalMetrics.model_validate(report["parent_metrics"]) if report["parent_metrics"] else None
    gate = evaluate_gate(task.gate_metric, metrics, parent_metrics)
    manifest = Manifest(
        version="pending",
        model=model,
        parent=parent,
        base_model=mcfg.base_model,
        task=mcfg.task,
        labels=mcfg.labels,
        training={**tcfg.model_dump(), "steps": report["steps"]},
        data=data,
        metrics=metrics,
        parent_metrics=parent_metrics,
        gate=gate,
        status="accepted" if gate.accepted else "rejected",
        job_id=job.job_id,
    )
    with result.checkpoint.as_directory() as ckpt_dir:
        manifest = registry.publish(model, ckpt_dir, manifest)
    job.version = manifest.version
    job.metrics = metrics.model_dump()
    if gate.accepted:
        promote_or_wait(registry, job, manifest.version, parent, gate.reason)  # sets job.promoted
        job.state = "succeeded"
    else:
        job.state, job.promoted = "rejected", False
        job.message = f"{manifest.version} rejected by the gate: {gate.reason}"
    log.info("job %s: %s %s (%s)", job.job_id, manifest.version, job.state, job.message)
    return manifest

"""All of tuneloop's Prometheus metrics, in one module.

Serve replicas are separate processes, so the metrics use prometheus-client's
multiprocess mode: every process writes to files under $PROMETHEUS_MULTIPROC_DIR and
the ingress's GET /metrics aggregates them. Training runs are counted from the job
records in storage, so jobs started by the CLI in another process are counted too.
Labels stay low-cardinality: model, version, outcome (and the node of a replica's series);
never a text, a request id or a key.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter as _Tally
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tuneloop.core.rollout import VersionHealth
from tuneloop.store.jobs import JobStore
from tuneloop.store.registry import Registry
from tuneloop.store.registry_state import RegistryState, is_version_name, version_number

log = logging.getLogger(__name__)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
NODE_LABEL = "node"  # the Ray node a replica series comes from (its id's first 12 hex digits)
if os.environ.get(MULTIPROC_ENV):  # a replica on a node where no one made it yet (serve deploy, RayService)
    os.makedirs(os.environ[MULTIPROC_ENV], mode=0o700, exist_ok=True)

# A version's series stay this long after it left service: past any rate() window a
# dashboard or alert uses (deploy/prometheus: 5 minutes), so its last increments are counted.
RETIRED_SERIES_S = 3600.0
# Up to what the config allows (serving.request_timeout_s <= 3600, max_batch_size <= 1024,
# a batch of 1024 x max_length 8192 tokens): past the top bucket a value says only "more",
# and the rollout's p99 (quantile_from_buckets) stopped at 30 s.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072, 524288, 2097152, 8388608)

REQUESTS = Counter(
    "tuneloop_requests", "Predict requests by outcome", ["model", "version", "outcome"]
)
REQUEST_LATENCY_SECONDS = Histogram(
    "tuneloop_request_latency_seconds", "Predict latency in the model replica, from request received to answer",
    ["model", "version"], buckets=_LATENCY_BUCKETS,
)
MODEL_COMPUTE_SECONDS = Histogram(
    "tuneloop_model_compute_seconds", "Time of one batch's tokenization and forward pass",
    ["model", "version"], buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "tuneloop_batch_size", "Texts per model batch", ["model", "version"], buckets=_BATCH_BUCKETS
)
QUEUE_WAIT_SECONDS = Histogram(
    "tuneloop_queue_wait_seconds", "Time a text waited in the replica's queue before its batch started",
    ["model"], buckets=_LATENCY_BUCKETS,
)
BATCH_TOKENS = Histogram(
    "tuneloop_batch_tokens", "Tokens per model batch: real ones, and padded (what the forward pass computes)",
    ["model", "version", "kind"], buckets=_TOKEN_BUCKETS,
)
FEEDBACK = Counter("tuneloop_feedback", "Feedback records accepted", ["model"])
PREDICT_ERRORS = Counter(
    "tuneloop_predict_errors",
    "Predict requests the model failed (500; NaN scores 422), by the version whose batch failed, or did not answer "
    "in time (503), by the version they were routed to",
    ["model", "version"],
)
VERSION_LOAD_FAILURES = Counter(
    "tuneloop_version_load_failures",
    "Loads of a version that failed on a replica (each retry counts): a rollout's challenger that never loads "
    "is rolled back on them",
    ["model", "version"],
)
SHADOW_RUNS = Counter(
    "tuneloop_shadow_runs", "Requests a rollout's shadow version ran on (ok, error) or skipped under load (shed)",
    ["model", "version", "outcome"],
)
# The largest across a node's live replicas: every replica holding a version holds the same
# bytes of it. The most recent value was one replica's word for all: one that let a version go
# wrote 0 while another still served it, and a stopped replica's last values stayed.
RESIDENT_WEIGHT_BYTES = Gauge(
    "tuneloop_resident_weight_bytes", "Weights and buffers a replica holds for a version (0 once unloaded); "
    "at most two versions (production and a rollout's challenger) are resident", ["model", "version"],
    multiprocess_mode="livemax",
)
# The same for the runtimes each resident version runs on (serving.runtime): 1 while it
# does, 0 once the version is let go. ``texts``: ``batches`` (every batch), or ``lone`` (one
# short text alone, on a runtime quicker at it: choose_lone_runtime), so a lone text's
# answer is never put down to the batch runtime.
SERVING_RUNTIME = Gauge(
    "tuneloop_serving_runtime", "1 for the runtime (torch, torch-bf16, onnx, onnx-int8) a resident version runs on, "
    "for batches or for one short text alone; 0 once unloaded", ["model", "version", "runtime", "texts"],
    multiprocess_mode="livemax",
)
# A request's outcomes with no version (refused before one took it), and a version's own,
# at 0 from the replica's start and the version's load: a series born at its first increment
# lost that increment to rate() and increase(), a new canary's first error or timeout too.
UNVERSIONED_OUTCOMES = ("invalid", "rejected", "unavailable", "error", "cancelled")
VERSION_OUTCOMES = ("ok", "timeout")


def count_from_zero(model: str, version: str | None) -> None:
    """``model``'s request series at 0: the unversioned outcomes, or ``version``'s."""
    if version is None:
        for outcome in UNVERSIONED_OUTCOMES:
            REQUESTS.labels(model, "none", outcome)
        return
    for outcome in VERSION_OUTCOMES:
        REQUESTS.labels(model, version, outcome)
    PREDICT_ERRORS.labels(model, version)


PREDICTION_LOG_DROPPED = Counter(
    "tuneloop_prediction_log_dropped", "Prediction-log rows dropped (oldest first) while the log could not be written",
    ["model"],
)


@contextmanager
def timer(histogram: Histogram, *labels: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        histogram.labels(*labels).observe(time.perf_counter() - start)


class TrainingRunsCollector:
    """tuneloop_training_runs_total{model, outcome}: finished jobs, and
    tuneloop_training_jobs_running{model}, read from the job records. Every model's outcomes
    start at 0: a series born at 1 hid the first failure from ``increase()``, which alerts
    use, and a running job counted in the counter made it fall when the job ended (a reset
    to Prometheus, and a phantom run in every ``increase()``). A finished job stays counted
    under the outcome it was first counted with, for the life of this process, and beyond it
    by its record's ``counted_as``: a record briefly unreadable, or a job marked lost whose
    process then finished, made the counter fall, and the failure alert fire on the reset."""

    OUTCOMES = ("succeeded", "rejected", "failed")

    # (storage root, job id) -> (model, outcome), once counted; for the process, as a
    # collector lasts one scrape (a process reading two roots, as tests do, keeps them apart)
    _finished: dict[tuple[str, str], tuple[str, str]] = {}

    def __init__(self, jobs: JobStore, models: list[str]):
        self.jobs, self.models = jobs, models

    def collect(self):
        try:
            records = self.jobs.all()
        except Exception as e:  # noqa: BLE001 - the job store's trouble must not fail the scrape
            log.warning("metrics: no job records: %s", e)
            return
        runs = CounterMetricFamily("tuneloop_training_runs", "Finished training jobs by outcome",
                                   labels=["model", "outcome"])
        running = GaugeMetricFamily("tuneloop_training_jobs_running", "Training jobs running now", labels=["model"])
        root = self.jobs.storage.uri
        for j in records:
            if j.state in self.OUTCOMES:
                self._finished.setdefault((root, j.job_id), (j.model, j.counted_as or j.state))
        counted = [outcome for (where, _), outcome in self._finished.items() if where == root]
        tally = _Tally([*counted, *((j.model, j.state) for j in records if j.state == "running")])
        for model in sorted(set(self.models) | {m for m, _ in tally}):
            for outcome in self.OUTCOMES:
                runs.add_metric([model, outcome], tally[model, outcome])
            running.add_metric([model], tally[model, "running"])
        yield runs
        yield running


class ReplicasCollector:
    """tuneloop_replicas{model}: running replicas, as Serve reports them at scrape time; and
    tuneloop_replicas_min{model}, the fewest the config keeps (``serving.num_replicas``, or
    ``autoscaling.min_replicas``), so that an alert on no replica can leave out the models
    allowed to scale to zero."""

    def __init__(self, running_replicas: Callable[[], dict[str, int]], min_replicas: int):
        self.running_replicas, self.min_replicas = running_replicas, min_replicas

    def collect(self):
        try:
            replicas = self.running_replicas()
        except Exception as e:  # noqa: BLE001 - Serve's status unreadable: the other series still go out
            log.warning("metrics: no replica counts from Serve: %s", e)
            return
        family = GaugeMetricFamily("tuneloop_replicas", "Running replicas per model", labels=["model"])
        least = GaugeMetricFamily("tuneloop_replicas_min", "Fewest replicas the config keeps per model (0: it may "
                                  "scale to zero)", labels=["model"])
        for model, n in sorted(replicas.items()):
            family.add_metric([model], n)
            least.add_metric([model], self.min_replicas)
        yield family
        yield least


class FeedbackStatsCollector:
    """Gauges from the feedback itself (cluster/feedback_stats.py), computed at scrape time:
    tuneloop_feedback_online_accuracy{model, version} and tuneloop_feedback_labels{model, label}."""

    def __init__(self, stats: Callable[[], list[dict]]):
        self.stats = stats

    def collect(self):
        accuracy = GaugeMetricFamily("tuneloop_feedback_online_accuracy",
                                     "Share of feedback agreeing with what the version served",
                                     labels=["model", "version"])
        judged = GaugeMetricFamily("tuneloop_feedback_judged", "Predictions with feedback, by the version that "
                                   "served them (online accuracy's sample size)", labels=["model", "version"])
        labels = GaugeMetricFamily("tuneloop_feedback_labels", "Feedback records counted, by label",
                                   labels=["model", "label"])
        for s in self.stats():
            for version, v in s["by_version"].items():
                accuracy.add_metric([s["model"], version], v["online_accuracy"])
                judged.add_metric([s["model"], version], v["feedback"])
            for label, n in s["by_label"].items():
                labels.add_metric([s["model"], label], n)
        yield accuracy
        yield judged
        yield labels


_ROLLOUT_EVENTS = ("rollout", "step", "promote", "abort", "pause", "resume", "alert")
_DECIDED_BY = ("automatic", "job", "operator")



class RolloutCollector:
    """A rollout's traffic and decisions, read from the registry's state at scrape time:
    tuneloop_traffic_share{model, version, role} (production and canary: the share of
    requests each answers; shadow: the share it also runs), tuneloop_rollout_events_total
    {model, event, by} (automatic: decided by the rollout driver; job: a training job's
    promotion; operator: by hand) and
    tuneloop_rollout_alert{model, version} (1: no decision past rollout.inconclusive_after_s)."""

    def __init__(self, states: dict[str, RegistryState], shadow_percent: float):
        self.states, self.shadow_percent = states, shadow_percent

    def collect(self):
        share = GaugeMetricFamily("tuneloop_traffic_share", "Share of requests each version answers (shadow: "
                                  "runs too)", labels=["model", "version", "role"])
        events = CounterMetricFamily("tuneloop_rollout_events", "Rollout events: rollout, step, promote, abort, "
                                     "pause, resume, alert", labels=["model", "event", "by"])
        alert = GaugeMetricFamily("tuneloop_rollout_alert", "1 while a rollout waits past its inconclusive timeout",
                                  labels=["model", "version"])
        for model, state in self.states.items():
            r = state.rollout
            canary = r.percent / 100 if r and r.stage == "canary" else 0.0
            if state.production:
                share.add_metric([model, state.production, "production"], 1.0 - canary)
            if r:
                role, value = ("canary", canary) if r.stage == "canary" else ("shadow", self.shadow_percent / 100)
                share.add_metric([model, r.version, role], value)
                alert.add_metric([model, r.version], float(r.alerted))
            tally = state.decisions()  # HistoryEntry.decided_by, archived entries included
            for event in _ROLLOUT_EVENTS:  # from 0, so that increase() sees the first one
                for by in _DECIDED_BY:
                    events.add_metric([model, event, by], tally.get((event, by), 0))
        yield share
        yield events
        yield alert


class ServingTimeCollector:
    """tuneloop_feedback_to_serving_seconds{model, version, phase}: how long the newest
    feedback the production version learned from took to reach all traffic, by phase
    (cluster/core/serving_time.py) and in total, read from its manifest at scrape time."""

    def __init__(self, registry: Registry, states: dict[str, RegistryState]):
        self.registry, self.states = registry, states

    def collect(self):
        family = GaugeMetricFamily("tuneloop_feedback_to_serving_seconds",
                                   "Feedback-to-serving time of the production version, by phase",
                                   labels=["model", "version", "phase"])
        for model, state in self.states.items():
            production = state.production
            try:
                timing = self.registry.manifest(model, production).serving_time if production else None
            except Exception as e:  # noqa: BLE001 - one unreadable manifest must not cost the whole scrape
                log.warning("metrics: no feedback-to-serving time for %s: %s", model, e)
                continue
            if timing is None:
                continue
            for phase, seconds in [*timing.phases.items(), ("total", timing.total_s)]:
                if seconds is not None:
                    family.add_metric([model, production, phase], seconds)
        yield family


class FilesCollector:
    """The replicas' metrics, merged from their multiprocess files per node (gathered by
    serving/metric_files.py), each series labelled with its ``node``. Per-node series, not
    one sum: when a node leaves (scale-down) or misses a scrape, its series go stale and
    ``sum(rate(...))`` over the rest stays right, where a sum would drop and read to
    Prometheus as a counter reset (a spike in ``rate()``)."""

    def __init__(self, files_by_node: dict[str, list[str]]):
        self.files_by_node = files_by_node

    def collect(self):
        families: dict[str, Metric] = {}  # one family per name: the exposition format allows one
        for node, files in self.files_by_node.items():
            for merged in multiprocess.MultiProcessCollector.merge(files, accumulate=True):
                family = families.setdefault(merged.name, Metric(merged.name, merged.documentation, merged.type,
                                                                 merged.unit))
                for sample in merged.samples:
                    family.add_sample(sample.name, {**sample.labels, NODE_LABEL: node}, sample.value,
                                      sample.timestamp, sample.exemplar)
        return list(families.values())


def version_health(files_by_node: dict[str, list[str]], model: str) -> dict[str, dict[str, VersionHealth]]:
    """Each node's serving counts by version, for a rollout's health (control/rollout_driver.py,
    which measures a stage node by node: ``health_since``)."""
    return {node: _node_health(files, model) for node, files in files_by_node.items()}


def _node_health(files: list[str], model: str) -> dict[str, VersionHealth]:
    """Each version's serving counts, summed over one node's replicas: requests (answered,
    and failed in the model) with the answered ones' latency buckets; a shadow's runs and
    failures (its answers reach no user, so no latency); loads that failed, and whether a
    replica holds it resident."""
    requests: dict[str, float] = defaultdict(float)
    errors: dict[str, float] = defaultdict(float)
    load_failures: dict[str, float] = defaultdict(float)
    resident: set[str] = set()
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for family in FilesCollector({"": files}).collect():
        for s in family.samples:
            if s.labels.get("model") != model or "version" not in s.labels:
                continue
            version, outcome = s.labels["version"], s.labels.get("outcome")
            if s.name == "tuneloop_request_latency_seconds_bucket":
                buckets[version][float(s.labels["le"])] += s.value
            elif s.name == "tuneloop_request_latency_seconds_count":
                requests[version] += s.value
            elif s.name == "tuneloop_predict_errors_total" or (s.name == "tuneloop_shadow_runs_total"
                                                                and outcome == "error"):
                requests[version] += s.value
                errors[version] += s.value
            elif s.name == "tuneloop_shadow_runs_total" and outcome == "ok":
                requests[version] += s.value
            elif s.name == "tuneloop_version_load_failures_total":
                load_failures[version] += s.value
            elif s.name == "tuneloop_resident_weight_bytes" and s.value > 0:
                resident.add(version)  # some live replica of the node holds it (livemax)
    # A version that never loaded has no request: listed all the same, by its failed loads.
    return {v: VersionHealth(requests[v], errors[v], tuple(sorted(buckets[v].items())), load_failures[v],
                             v in resident) for v in requests.keys() | load_failures.keys() | resident}


class InServiceCollector:
    """Another collector's series, less those of versions that left service over
    ``RETIRED_SERIES_S`` ago (``RegistryState.in_service_since``). A replica's counters live
    in its multiprocess files for good, so a model retrained every hour would otherwise
    expose a dozen latency, batch and token histograms per node for every version it ever
    had. A version back in service (a rollback to it) shows its series again. ``in_service``:
    model -> (its versions in service since, the newest version its state names); newer
    versions than that show, and so do all of a model left out (its state unread)."""

    def __init__(self, source: Any, in_service: dict[str, tuple[set[str], int]]):
        self.source, self.in_service = source, in_service

    def collect(self):
        for family in self.source.collect():
            family.samples = [s for s in family.samples if not self._retired(s.labels)]
            yield family

    def _retired(self, labels: dict[str, str]) -> bool:
        version, known = labels.get("version"), self.in_service.get(labels.get("model"))
        if known is None or not is_version_name(version):
            return False
        kept, newest = known
        return version not in kept and version_number(version) <= newest


def _states(registry: Registry, models: list[str]) -> dict[str, RegistryState]:
    states = {}
    for model in models:
        try:
            states[model] = registry.state(model)
        except Exception as e:  # noqa: BLE001 - one model's storage trouble must not fail the scrape
            log.warning("metrics: no registry state for %s: %s", model, e)
    return states


def render(jobs: JobStore, running_replicas: Callable[[], dict[str, int]], registry: Registry, models: list[str],
           feedback_stats: Callable[[], list[dict]] | None, files: dict[str, list[str]] | None = None,
           shadow_percent: float = 100.0, min_replicas: int = 1) -> bytes:
    """The exposition text for GET /metrics: every process's metrics (from ``files``, the
    multiprocess files of each node, when given), training runs, replicas,
    feedback-to-serving time and, when ``feedback_stats`` is given (the caller may read them),
    feedback statistics; none of a long-retired version (``InServiceCollector``)."""
    states = _states(registry, models)  # read once a scrape: one GET each on a bucket
    runs = CollectorRegistry()
    runs.register(TrainingRunsCollector(jobs, models))
    runs.register(ReplicasCollector(running_replicas, min_replicas))
    runs.register(ServingTimeCollector(registry, states))
    runs.register(RolloutCollector(states, shadow_percent))
    if feedback_stats is not None:
        runs.register(FeedbackStatsCollector(feedback_stats))
    if files is not None:
        served = CollectorRegistry()
        served.register(FilesCollector(files))
    elif os.environ.get(MULTIPROC_ENV):
        served = CollectorRegistry()
        multiprocess.MultiProcessCollector(served)
    else:  # one process (unit use): its own default registry holds everything
        served = REGISTRY
    since = datetime.now(UTC) - timedelta(seconds=RETIRED_SERIES_S)
    in_service = {m: (state.in_service_since(since), state.newest_named()) for m, state in states.items()}
    out = b""
    for source in (served, runs):
        shown = CollectorRegistry(auto_describe=False)
        shown.register(InServiceCollector(source, in_service))
        out += generate_latest(shown)
    return out

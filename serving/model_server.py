"""The model deployment: one per served model, continuous batching, hot version swaps.

It answers ``POST /v1/models/<model>/predict`` itself: each model is its own Serve
application whose route is exactly that path, so HAProxy hands the request straight to this
replica. Through the FastAPI ingress and a handle call, every request crossed one more
process and paid ~2 ms of CPU there (measured with py-spy), which on 2 cores is taken
from the forward passes. Without FastAPI: the body is checked by ``predict_request``.

Each replica loads the registry's production version and keeps watching the registry's
state file; when production changes (a training job promoted a version, from this process
or another) it loads the new weights beside the old ones and swaps one reference. A batch
already running finishes on the model it started with, so no request is dropped, and the
application is never restarted. A version optimized again (``tuneloop optimize``) is swapped
the same way onto the runtime its new build gives (``_pick_up_rebuilds``). What a version
loads as, and what happens when it does not load, is ``version_loader.py``'s.

During a rollout (core/rollout.py, in the same state file) it also holds the challenger: at
most two versions resident, each with its own batch queue and one compute thread for both.
In canary, a request whose client falls below the canary's percent (``canary_bucket`` of
its ``X-Client-Id``, else of the request) is answered by the challenger. In
shadow, after production's answer is sent, a share of requests is run on the challenger
too, and its answers logged under the same prediction ids (``SHADOW_ROOT``); shadow work is
shed first: it starts only when the compute thread is idle, one shadow batch at a time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from tuneloop.store.keys import KeyRing
from tuneloop.core.auth import single_header
from tuneloop.core.config import ServingConfig, TuneloopConfig
from tuneloop.core.errors import (InputRejected, InvalidRequest, MethodNotAllowed, NonFiniteScores, NotFound, NotReady,
                                  Overloaded, TimedOut, TuneloopError)
from tuneloop.store.prediction_recorder import PredictionRecorder
from tuneloop.store.records import SHADOW_ROOT, PredictionLog, new_prediction_id, prediction_time
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage
from tuneloop.serving import metrics
from tuneloop.serving.fast_path import log_to_stderr
from tuneloop.serving.metric_files import use_node_folder
from tuneloop.serving.responses import error_response, internal_error_response
from tuneloop.serving.batcher import ComputeSlot, ContinuousBatcher, ItemFailed
from tuneloop.serving.loaded_models import LoadedModel, load_model
from tuneloop.serving.version_loader import VersionLoader
from tuneloop.core.batching_policy import (RECENT_BATCHES, AIMDPolicy, next_batch_size, over_capacity,
                                           unit_seconds, work_units)
from tuneloop.core.rollout import Rollout, canary_bucket
from tuneloop.core.tasks import model_task
from tuneloop.serving.predict_request import (
    BodyBudget,
    PredictLimits,
    check_content_encoding,
    check_content_length,
    check_content_type,
    parse_predict_body,
    read_body,
)

log = logging.getLogger(__name__)
CLIENT_HEADER = "x-client-id"  # keeps a client on one version through a canary step
# Set on a batch's exception: the version that computed it (a request queued before production
# changed ran on the new one, whose failures counted against the old).
COMPUTED_BY = "tuneloop_computed_by"


def request_outcome(error: TuneloopError) -> str:
    """``tuneloop_requests_total``'s outcome of a refused request: ``invalid`` (the client's
    4xx), ``rejected`` (overload: more traffic than replicas), ``unavailable`` (another 503: no
    version loaded, storage or the key file out of reach), ``error`` (the model scored the
    input NaN: a 422 to the client, a fault of the version). A version that failed to load
    counted as overload, and NaN scores as the client's error: neither reached an alert."""
    if isinstance(error, NonFiniteScores):
        return "error"
    if error.status < 500:
        return "invalid"
    return "rejected" if isinstance(error, Overloaded) else "unavailable"


def in_flight_limit(s: ServingConfig) -> int:
    """Requests one replica holds: enough to fill several batches, plus the bounded queue."""
    return s.max_batch_size * 4 + s.max_queued_requests


def _runtimes_of(loaded: LoadedModel) -> list[tuple[str, str]]:
    """What answers which texts of a version, as tuneloop_serving_runtime's ``texts`` labels
    them: every batch on its runtime, but one short text alone on ``lone``'s, if it has one."""
    return [("batches", loaded.runtime)] + ([("lone", loaded.lone.runtime)] if loaded.lone else [])


class ModelServer:
    """Serve constructs it from the config and a model name (``bind``). Its collaborators —
    the registry, the prediction recorder, the key ring, the model loader — are built from
    the config unless given, so tests hand it fakes (a loader that needs no torch) and run
    its decisions in milliseconds, without Ray; ``watch=False`` leaves the registry watch
    to the test (``_sync_with_registry``)."""

    def __init__(self, config: dict, model: str, *, registry: Registry | None = None,
                 recorder: PredictionRecorder | None = None, shadow_recorder: PredictionRecorder | None = None,
                 keys: KeyRing | None = None,
                 load: Callable[..., LoadedModel] | None = None, watch: bool = True):
        use_node_folder()  # first: before any metric value (serving/metric_files.py)
        log_to_stderr()
        cfg = TuneloopConfig.model_validate(config)
        self.cfg, self.serving = cfg.model(model), cfg.serving
        self.task = model_task(self.cfg)
        storage = Storage(cfg.storage.root)
        self.registry = registry or Registry(storage)
        p = cfg.predictions
        self.recorder = recorder or PredictionRecorder(
            PredictionLog(storage, {model: self.task}), model, p.sample_rate, p.flush_interval_s, p.retention_days,
            max_buffered_rows=p.max_buffered_rows, on_drop=metrics.PREDICTION_LOG_DROPPED.labels(model).inc)
        # Shadow answers: every one logged (they are scored against feedback in pairs).
        self.shadow_recorder = shadow_recorder or PredictionRecorder(
            PredictionLog(storage, {model: self.task}, root=SHADOW_ROOT), model, 1.0, p.flush_interval_s,
            p.retention_days, max_buffered_rows=p.max_buffered_rows,
            on_drop=metrics.PREDICTION_LOG_DROPPED.labels(model).inc)
        self.rollout_cfg = cfg.rollout
        self._keys = keys or KeyRing(cfg.auth, storage, background=True)
        self._own_keys = keys is None  # its refresher thread is this replica's to stop
        if load is None:
            import torch

            torch.set_num_threads(self.serving.replica_threads)
        # One thread runs the model: forward passes never overlap, and the event loop stays
        # free to collect the next batch while this one computes.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        options = self.task.serving_tokenizer_options(self.serving.max_length)
        self._window_stride = options.get("stride") if options.get("return_overflowing_tokens") else None
        self._versions = VersionLoader(
            model, self.task, self.serving, cfg.optimize, self.registry,
            load or functools.partial(load_model, gpu=self.serving.num_gpus_per_replica > 0,
                                      max_rows=self.serving.max_batch_size), self._compute, self._window_stride)
        self._policy = AIMDPolicy(
            target_batch_latency_s=self.serving.target_batch_latency_s, max_batch_size=self.serving.max_batch_size
        )
        self._slot: ComputeSlot | None = None
        self._slot_loop: asyncio.AbstractEventLoop | None = None
        self._batcher = self._new_batcher("production")
        self._challenger_batcher = self._new_batcher("challenger")
        self._limits = PredictLimits.from_config(self.serving)
        self._body_budget = BodyBudget(self.serving.max_body_bytes_in_flight)
        # Requests this replica holds (running or waiting); past the bound: 503 at once.
        self._in_flight = 0
        self._max_in_flight = in_flight_limit(self.serving)
        # The work the held requests carry (batching_policy.work_units), and (seconds, units) of
        # production's recent batches since it took production: past request_timeout_s of
        # work, a 503 at once. A task that reads long texts in windows counts each window.
        self._units_in_flight = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=RECENT_BATCHES)
        self._warm: weakref.WeakSet[LoadedModel] = weakref.WeakSet()  # versions that ran a batch here
        self._loaded: LoadedModel | None = None
        self._challenger: LoadedModel | None = None  # a rollout's, beside production
        self._rollout: Rollout | None = None
        self._shadowing = 0  # shadow batches running (at most one)
        self._computing = 0  # production or canary batches handed to the compute thread
        self._resident: dict[str, int] = {}  # version -> weight bytes, as last reported
        self._reported_runtimes: set[tuple[str, str, str]] = set()  # tuneloop_serving_runtime's rows at 1
        self._stop = threading.Event()
        self._replica_id = uuid.uuid4().hex[:16]
        metrics.count_from_zero(model, None)
        if watch:
            self._sync_with_registry()
            threading.Thread(target=self._watch_registry, name="registry-watch", daemon=True).start()

    # -- versions ------------------------------------------------------------------------
    def _new_batcher(self, role: str) -> ContinuousBatcher:
        return ContinuousBatcher(functools.partial(self._predict_batch, role), max_batch_size=self.serving.max_batch_size,
                                 length=len if self.task.batch_by_length else None, on_batch=self._observe_waits,
                                 slot=self._compute_slot)

    def _compute_slot(self) -> ComputeSlot:
        """The slot production's and the challenger's batchers take before choosing a batch
        (one compute thread): in a canary, production chose a batch of 1 while the canary's
        batch ran, and later arrivals waited a whole extra batch. One per event loop (its
        futures belong to the loop they were made in)."""
        loop = asyncio.get_running_loop()
        if self._slot_loop is not loop:
            self._slot, self._slot_loop = ComputeSlot(), loop
        return self._slot

    def _sync_with_registry(self) -> None:
        state = self.registry.state(self.cfg.name)
        production, rollout = state.production, state.rollout
        challenger = rollout.version if rollout else None
        if self._challenger is not None and self._challenger.version not in (production, challenger):
            self._challenger = None  # a challenger the state no longer names goes before a new production loads
        if production is not None and not (self._loaded and self._loaded.version == production):
            reuse = self._challenger if self._challenger and self._challenger.version == production else None
            new = reuse or self._versions.load(production, self._serving_version())  # the challenger promoted: already resident
            if new is not None and reuse is None and not self._still_named(production, "production"):
                return  # rolled back while it loaded: the next tick serves what the state names now
            if new is not None:
                old, self._loaded = self._loaded, new  # one reference swap; running batches keep `old`
                self._cost_from(new)
                log.info("model %s now serving %s (was %s)", self.cfg.name, production, old.version if old else None)
                try:  # the rollout's end, for the version's feedback-to-serving time
                    self.registry.record_switch(self.cfg.name, production, self._replica_id)
                except OSError as e:
                    log.warning("model %s: could not note the switch to %s: %s", self.cfg.name, production, e)
        if challenger is None or challenger == production:
            if self._challenger is not None and self._challenger is not self._loaded:
                log.info("model %s: challenger %s unloaded", self.cfg.name, self._challenger.version)
            self._challenger = None
        elif not (self._challenger and self._challenger.version == challenger):
            self._challenger = None  # first out: never three versions resident
            self._challenger = self._versions.load(challenger, self._serving_version())
            if self._challenger is not None and not self._still_named(challenger, "challenger"):
                self._challenger = None  # the rollout ended while it loaded
                return
            if self._challenger is not None:
                log.info("model %s: challenger %s loaded (%s; %.0f MB of weights, %.0f MB with production's)",
                         self.cfg.name, challenger, rollout.stage, self._challenger.weight_bytes / 1e6,
                         (self._challenger.weight_bytes + (self._loaded.weight_bytes if self._loaded else 0)) / 1e6)
        self._rollout = rollout
        self._versions.forget_all_but({production, challenger})
        self._report_resident()

    def _cost_from(self, production: LoadedModel) -> None:
        """Production's cost a unit of work, measured anew for a version (or a runtime) it just
        took: its warm-up batch's until its own batches come, all of them warm. Another
        version's cost is not its own, and before this a replica had none until its first
        warm batches: a burst at a new replica was let in whole and timed out."""
        self._recent.clear()
        if production.warm_batch is not None:
            self._recent.append(production.warm_batch)

    def _still_named(self, version: str, role: str) -> bool:
        """Whether the state still names ``version`` as ``role`` after its load: a load takes
        seconds (a download, runtimes timed here), and a rollback in the meantime had every
        replica swap to the version just rolled back, answer with it, and record the switch."""
        state = self.registry.state(self.cfg.name)
        named = state.production if role == "production" else state.rollout.version if state.rollout else None
        if named != version:
            log.info("model %s: %s loaded, but the state names %s as %s now: not swapped in", self.cfg.name,
                     version, named, role)
        return named == version

    def _serving_version(self) -> str | None:
        return self._loaded.version if self._loaded else None

    def _report_resident(self) -> None:
        """tuneloop_resident_weight_bytes and tuneloop_serving_runtime of the versions this
        replica holds now (at most two), and 0 for what it let go since the last report: a
        version, or a runtime a rebuild moved one off."""
        held = [m for m in (self._loaded, self._challenger) if m is not None]
        resident = {m.version: m.weight_bytes for m in held}
        runtimes = {(m.version, runtime, texts) for m in held for texts, runtime in _runtimes_of(m)}
        for version in resident.keys() - self._resident.keys():
            metrics.count_from_zero(self.cfg.name, version)
        for version in self._resident.keys() - resident.keys():
            metrics.RESIDENT_WEIGHT_BYTES.labels(self.cfg.name, version).set(0)
        for version, size in resident.items():
            if self._resident.get(version) != size:
                metrics.RESIDENT_WEIGHT_BYTES.labels(self.cfg.name, version).set(size)
        for row in self._reported_runtimes - runtimes:
            metrics.SERVING_RUNTIME.labels(self.cfg.name, *row).set(0)
        for row in runtimes - self._reported_runtimes:
            metrics.SERVING_RUNTIME.labels(self.cfg.name, *row).set(1)
        self._resident, self._reported_runtimes = resident, runtimes

    def _pick_up_rebuilds(self) -> None:
        """Swap in each resident version ``tuneloop optimize`` built again (``VersionLoader.rebuilt``),
        one reference at a time, as versions are swapped."""
        swaps = self._versions.rebuilt([m for m in (self._loaded, self._challenger) if m is not None])
        for current, new in swaps:
            if self._loaded is current:
                self._loaded = new
                self._cost_from(new)
            if self._challenger is current:
                self._challenger = new
        if swaps:
            self._report_resident()

    def _watch_registry(self) -> None:
        while not self._stop.wait(self.serving.reload_interval_s):
            try:
                self._sync_with_registry()
            except Exception:  # noqa: BLE001 - keep serving the loaded version; retry next tick
                log.exception("model %s: could not load the new production version", self.cfg.name)
            try:
                self._pick_up_rebuilds()
            except Exception as e:  # noqa: BLE001 - storage out of reach: the builds serving stay; next check
                log.warning("model %s: could not check for a new optimize build (%s: %s)", self.cfg.name,
                            type(e).__name__, e)

    def status(self) -> dict[str, Any]:
        return {"model": self.cfg.name, "version": self._loaded.version if self._loaded else None,
                "challenger": self._challenger.version if self._challenger else None,
                "rollout": self._rollout.model_dump() if self._rollout else None, "refused": dict(self._versions.refused),
                # Copies first (dict() is one step under the GIL): the watcher thread adds and
                # removes entries while a request reads them ("changed size during iteration").
                "failed": {v: why for v, (_, why, _) in dict(self._versions.failed).items()},
                "resident_weight_bytes": dict(self._resident),
                "runtimes": {v: "{} ({})".format(*self._versions.runtimes[v]) for v in self._resident}}

    # -- HTTP ------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        model = self.cfg.name
        held = 0
        try:
            if request.scope["path"].rstrip("/") != request.scope.get("root_path", "").rstrip("/"):
                raise NotFound(f"no route {request.url.path!r}")
            if request.method != "POST":
                wrong = MethodNotAllowed(f"{request.method} is not allowed here; use POST")
                wrong.headers = {"Allow": "POST"}  # as the ingress's 405s say it
                raise wrong
            self._keys.check(single_header(request.headers.getlist("authorization"), "Authorization"), "predict")
            check_content_type(single_header(request.headers.getlist("content-type"), "Content-Type"))
            check_content_encoding(request.headers.getlist("content-encoding"))
            check_content_length(request.headers.get("content-length"), self._limits.max_body_bytes)
            body = await read_body(request.stream(), self._limits.max_body_bytes, self.serving.body_timeout_s,
                                   self._body_budget)
            held = len(body)
            texts = parse_predict_body(body, self._limits, self.task)
            del body  # its texts stay held until answered: the budget counts the body's bytes for them
            # Not the API key: one service key shared by an application put all of its traffic on
            # one side of the canary, 0% or 100% at a 5% step, whatever the percent said.
            predictions = await self.predict(texts, client=request.headers.get(CLIENT_HEADER))
        except TimedOut as e:  # the version it was routed to did not answer in time
            metrics.REQUESTS.labels(model, e.version, "timeout").inc()
            return error_response(e)
        except TuneloopError as e:
            metrics.REQUESTS.labels(model, "none", request_outcome(e)).inc()
            return error_response(e)
        except asyncio.CancelledError:  # the client left, or the proxy gave up: counted, not answered
            metrics.REQUESTS.labels(model, "none", "cancelled").inc()
            raise
        except ClientDisconnect:  # gone before its body was read: no one to answer, no error of ours
            metrics.REQUESTS.labels(model, "none", "invalid").inc()
            return error_response(InvalidRequest("the client disconnected before its body was read"))
        except Exception:
            metrics.REQUESTS.labels(model, "none", "error").inc()
            log.exception("model %s: predict failed", model)
            return internal_error_response()
        finally:
            self._body_budget.give(held)
        # Under each version that answered some of its texts (a swap between two of its
        # batches answers a request with two): the first alone left the other's latency out
        # of a canary's p99.
        for version in dict.fromkeys(p["version"] for p in predictions):
            metrics.REQUEST_LATENCY_SECONDS.labels(model, version).observe(time.perf_counter() - start)
            metrics.REQUESTS.labels(model, version, "ok").inc()
        return JSONResponse({"model": model, "predictions": predictions})

    # -- predictions ---------------------------------------------------------------------
    async def predict(self, texts: list[str], client: str | None = None) -> list[dict[str, Any]]:
        """Predict a request's texts; they join a batch queue together: production's, or
        in canary the challenger's when ``client`` (else the request) falls in its share."""
        if self._loaded is None:
            # A load's own error names local paths and bucket keys: the log has it, not anyone
            # who may call predict (open by default).
            why = "; ".join([*dict(self._versions.refused).values(),
                             *(f"{v} did not load; the server's log says why" for v in dict(self._versions.failed))])
            raise NotReady(f"model {self.cfg.name!r} has no production version loaded yet" + (f" ({why})" if why else ""))
        if self._in_flight >= self._max_in_flight:
            raise Overloaded(f"model {self.cfg.name!r} is at capacity ({self._in_flight} requests); retry shortly")
        units = work_units(texts, self.serving.max_length, self._window_stride)
        # A copy: the registry watch's thread clears it when production changes.
        full = over_capacity(self._units_in_flight, units, unit_seconds(tuple(self._recent)), self._oldest_wait(),
                             self.serving.request_timeout_s)
        if full:
            raise Overloaded(f"model {self.cfg.name!r} is at capacity ({full}; request_timeout_s "
                             f"{self.serving.request_timeout_s:g}); retry shortly")
        rollout = self._rollout
        challenger = self._rollouts_challenger(rollout)
        canary = (rollout is not None and rollout.stage == "canary" and challenger is not None
                  and canary_bucket(client or uuid.uuid4().hex) < rollout.percent)
        routed = challenger if canary else self._loaded  # the version a failure counts against
        timeout = self.serving.request_timeout_s
        self._in_flight += 1
        self._units_in_flight += units
        try:
            batcher = self._challenger_batcher if canary else self._batcher
            predictions = await asyncio.wait_for(batcher.submit_many(texts), timeout)
        except ItemFailed as failed:
            # The model's faults (NaN scores too) count in a rollout's health, charged to the
            # version whose batch failed; a crash is answered (500, logged) before another
            # text's 422: the first failure alone hid a fault behind a bad text before it.
            faults = [(i, e) for i, e in failed.failures if isinstance(e, NonFiniteScores)
                      or not isinstance(e, TuneloopError)]
            for version in {getattr(e, COMPUTED_BY, routed.version) for _, e in faults}:
                metrics.PREDICT_ERRORS.labels(self.cfg.name, version).inc()
            index, error = next(((i, e) for i, e in faults if not isinstance(e, TuneloopError)),
                                (failed.index, failed.error))
            if isinstance(error, InputRejected):  # this request's alone; NaN scores stay a fault of ours
                raise type(error)(f"inputs[{index}]: {error.message}") from None
            raise error from None
        except TimeoutError:
            # Counted against the version it was routed to: a canary too slow to answer
            # otherwise left only its fast answers in its health (and its latency).
            metrics.PREDICT_ERRORS.labels(self.cfg.name, routed.version).inc()
            raise TimedOut(f"model {self.cfg.name!r} did not answer within {timeout:g}s; retry shortly",
                           routed.version) from None
        finally:
            self._in_flight -= 1
            self._units_in_flight -= units
        if rollout is not None and rollout.stage == "shadow" and challenger is not None:
            self._maybe_shadow(challenger, texts, predictions)
        return predictions

    def _oldest_wait(self) -> float:
        """Seconds the oldest text queued for a batch has waited (0 with none queued)."""
        oldest = min(self._batcher.oldest_arrival(), self._challenger_batcher.oldest_arrival())
        return max(0.0, time.monotonic() - oldest) if oldest != math.inf else 0.0

    def _rollouts_challenger(self, rollout: Rollout | None) -> LoadedModel | None:
        """The challenger, if it is ``rollout``'s version (the rollout as the caller read it):
        the watcher thread swaps the challenger before the rollout, and a new shadow, read
        beside the old canary's percent, answered users for that moment."""
        challenger = self._challenger
        mine = challenger is not None and rollout is not None and challenger.version == rollout.version
        return challenger if mine else None

    async def _predict_batch(self, role: str, texts: list[str]) -> list[dict[str, Any]]:
        # Pin one version for the whole batch; a challenger gone meanwhile (its rollout
        # ended), or not the rollout's (the next one swapped in first, a shadow), leaves its
        # queued texts to production: none is dropped, and none answered by a shadow (the
        # rollout now a shadow of the same or the next version: the challenger answered users).
        rollout = self._rollout
        challenger = self._rollouts_challenger(rollout) if rollout is not None and rollout.stage == "canary" else None
        loaded = challenger if role == "challenger" and challenger is not None else self._loaded
        batcher = self._challenger_batcher if role == "challenger" else self._batcher
        self._computing += 1
        try:
            results, seconds = await asyncio.get_running_loop().run_in_executor(
                self._compute, self._timed_batch, loaded, texts)
        except Exception as e:
            with contextlib.suppress(AttributeError):  # queued before a switch, it failed on this version
                setattr(e, COMPUTED_BY, loaded.version)
            if self.serving.adaptive_batching and len(texts) >= batcher.max_batch_size \
                    and not isinstance(e, TuneloopError):
                # The model failed on a full batch (out of memory on a GPU): shrink as for an
                # overrun. Its halves then succeeded under the limit, "partial, no signal", and
                # every full batch failed again. Not on the halves the batcher retries: one bad
                # input failing each of them shrank the limit five times.
                batcher.max_batch_size = next_batch_size(self._policy, batcher.max_batch_size, len(texts),
                                                         math.inf)
            raise
        finally:
            self._computing -= 1
        # Production's batches alone: not a challenger's (another cost), nor one of the version
        # production was when the batch began; nor the first of a version whose warm-up failed
        # (kernels and caches warm up).
        if (loaded.warm_batch is not None or loaded in self._warm) and loaded is self._loaded:
            self._recent.append((seconds, work_units(texts, self.serving.max_length, self._window_stride)))
        self._warm.add(loaded)
        if self.serving.adaptive_batching:  # the batch's own time: not its wait behind the other role's or a shadow's
            batcher.max_batch_size = next_batch_size(self._policy, batcher.max_batch_size, len(texts), seconds)
        return results

    def _timed_batch(self, loaded: LoadedModel, texts: list[str]) -> tuple[list[dict[str, Any]], float]:
        start = time.perf_counter()
        return self._run_batch(loaded, texts), time.perf_counter() - start

    # -- shadow ----------------------------------------------------------------------------
    def _maybe_shadow(self, challenger: LoadedModel, texts: list[str], predictions: list[dict[str, Any]]) -> None:
        """Run the shadow on a request already answered, unless that would take compute from
        production: shed while a batch computes or waits, or another shadow batch runs (so
        a shadow batch only ever starts on an idle compute thread)."""
        if random.random() * 100 >= self.rollout_cfg.shadow_percent:
            return
        if self._compute_wanted() or self._shadowing:
            metrics.SHADOW_RUNS.labels(self.cfg.name, challenger.version, "shed").inc()
            return
        self._shadowing += 1
        task = asyncio.get_running_loop().run_in_executor(
            self._compute, self._run_shadow, challenger, texts, [p["id"] for p in predictions])
        task.add_done_callback(self._shadow_done)

    def _compute_wanted(self) -> bool:
        """Production or a canary has work: texts waiting for a batch, or a batch computing or
        waiting for the compute thread."""
        return bool(self._batcher.queued or self._challenger_batcher.queued or self._computing)

    def _shadow_done(self, _future) -> None:
        self._shadowing -= 1

    def _run_shadow(self, challenger: LoadedModel, texts: list[str], ids: list[str]) -> None:
        try:
            # A request may hold more texts than a batch: pieces of the adaptive limit (a
            # 64-text request at the configured 32 held production for two overlong batches;
            # production's, which moves in every stage, and a canary's), and none once a batch
            # waits for the compute thread or texts for a batch (the rest is shed).
            results = []
            step = max(1, min(self._batcher.max_batch_size, self._challenger_batcher.max_batch_size))
            for i in range(0, len(texts), step):
                if i and self._compute_wanted():
                    metrics.SHADOW_RUNS.labels(self.cfg.name, challenger.version, "shed").inc()
                    return
                with metrics.timer(metrics.MODEL_COMPUTE_SECONDS, self.cfg.name, challenger.version):
                    results += challenger.predict(texts[i:i + step])[0]
        except Exception as e:  # noqa: BLE001 - counted against the challenger's health, never the request's
            metrics.SHADOW_RUNS.labels(self.cfg.name, challenger.version, "error").inc()
            log.warning("model %s: shadow %s failed on a request production answered: %s", self.cfg.name,
                        challenger.version, e)
            return
        metrics.SHADOW_RUNS.labels(self.cfg.name, challenger.version, "ok").inc()
        # Filed at the production answer's time (its id's), where a lookup of the id looks.
        self.shadow_recorder.record([
            {"prediction_id": pid, "model": self.cfg.name, "version": challenger.version, "text": text,
             "created_at": prediction_time(pid), **self.task.prediction_record(r)}
            for pid, text, r in zip(ids, texts, results, strict=True)])

    def _observe_waits(self, waits: list[float]) -> None:
        histogram = metrics.QUEUE_WAIT_SECONDS.labels(self.cfg.name)
        for wait in waits:
            histogram.observe(wait)

    def _run_batch(self, loaded: LoadedModel, texts: list[str]) -> list[dict[str, Any]]:
        with metrics.timer(metrics.MODEL_COMPUTE_SECONDS, self.cfg.name, loaded.version):
            results, tokens, padded = loaded.predict(texts)
        metrics.BATCH_SIZE.labels(self.cfg.name, loaded.version).observe(len(texts))
        metrics.BATCH_TOKENS.labels(self.cfg.name, loaded.version, "real").observe(tokens)
        metrics.BATCH_TOKENS.labels(self.cfg.name, loaded.version, "padded").observe(padded)
        now = datetime.now(UTC)
        rows = []
        for text, r in zip(texts, results, strict=True):
            r["id"] = new_prediction_id(now)
            r["version"] = loaded.version
            rows.append({"prediction_id": r["id"], "model": self.cfg.name, "version": loaded.version, "text": text,
                         "created_at": now, **self.task.prediction_record(r)})
        self.recorder.record(rows)  # written in the background, off the response path
        return results

    def __del__(self):
        self._stop.set()
        if self._own_keys:
            self._keys.close()
        self.recorder.close()
        self.shadow_recorder.close()

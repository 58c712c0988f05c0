"""The HTTP ingress: FastAPI behind Ray Serve, implementing DESIGN.md's contract (v1).

Every error leaves as ``{"error": {"code", "message"}}``: malformed JSON is a 400, a value
the schema rejects a 422, a body over the limits a 413, unknown names a 404. A 500 is
only ever our own bug, never something a client sent.
"""


import asyncio
import logging
import time
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictStr, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.config import TuneloopConfig
from cluster.controller import CONTROLLER_NAME, CONTROLLER_NAMESPACE
from cluster.errors import (
    Conflict,
    InvalidBody,
    InvalidLabel,
    MalformedJSON,
    MethodNotAllowed,
    NotFound,
    NotReady,
    TuneloopError,
    UnknownJob,
    UnknownModel,
    UnknownPrediction,
)
from cluster.jobs import JobStore
from cluster.auth import KeyRing, RateLimiter
from cluster.feedback_stats import feedback_stats
from cluster.records import FeedbackStore, PredictionLog, prediction_time
from cluster.registry import Registry
from cluster.storage import Storage
from serving import metrics
from serving.names import INGRESS_DEPLOYMENT, model_app_name, model_deployment_name
from serving.predict_request import check_content_length, check_content_type, check_text_length, max_body_bytes

log = logging.getLogger("ray.serve")
READY_TIMEOUT_S = 5.0
PREDICTION_LOG_SLACK_S = 1.0  # a flush's own time, beyond the replicas' flush interval

app = FastAPI(title="tuneloop", version="1")


class PredictRequest(BaseModel):
    """The predict body, as the model replicas check it (serving/predict_request.py)."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[StrictStr]


class EmptyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: StrictStr
    force: bool = False


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prediction_id: StrictStr | None = None
    model: StrictStr | None = None
    text: StrictStr | None = None
    label: StrictStr

    @model_validator(mode="after")
    def _one_form(self) -> "FeedbackRequest":
        by_id = self.prediction_id is not None
        by_text = self.model is not None or self.text is not None
        if by_id == by_text or (by_text and (self.model is None or self.text is None)):
            raise ValueError('give either "prediction_id" and "label", or "model", "text" and "label"')
        return self


def _error_response(exc: TuneloopError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(TuneloopError)
async def _tuneloop_error(_: Request, exc: TuneloopError) -> JSONResponse:
    return _error_response(exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return _error_response(MalformedJSON("the request body is not valid JSON"))
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg')}")
    return _error_response(InvalidBody("; ".join(parts)))


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    typed = {404: NotFound, 405: MethodNotAllowed}.get(exc.status_code)
    if typed is not None:
        return _error_response(typed(str(exc.detail)))
    return JSONResponse({"error": {"code": "http_error", "message": str(exc.detail)}}, status_code=exc.status_code)


@app.middleware("http")
async def _check_body(request: Request, call_next):
    try:
        if request.method == "POST":
            check_content_type(request.headers.get("content-type"))
        limit = getattr(request.app.state, "max_body_bytes", None)
        if limit is not None:
            check_content_length(request.headers.get("content-length"), limit)
    except TuneloopError as e:
        return _error_response(e)
    return await call_next(request)


@serve.deployment(name=INGRESS_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict):
        self.cfg = TuneloopConfig.model_validate(config)
        storage = Storage(self.cfg.storage.root)
        self.registry = Registry(storage)
        # The one feedback writer: recovers what a killed predecessor journalled, then
        # compacts the journal into Parquet in the background.
        self.feedback = FeedbackStore(storage, self.cfg.storage.journal_path())
        self.feedback.open_writer(self.cfg.feedback.compact_interval_s)
        self.predictions = PredictionLog(storage)
        self.jobs = JobStore(storage)
        self.auth = KeyRing(self.cfg.auth, storage)
        self.feedback_limit = RateLimiter(self.cfg.auth.feedback_per_minute, self.cfg.auth.feedback_burst)
        app.state.max_body_bytes = max_body_bytes(self.cfg.serving)

    def __del__(self):
        self.feedback.close()

    async def compact_feedback(self) -> int:
        """Called by a training job (through a handle) before it snapshots the feedback."""
        return await asyncio.to_thread(self.feedback.compact)

    def _model_cfg(self, name: str):
        try:
            return self.cfg.model(name)
        except KeyError:
            raise UnknownModel(name) from None

    def _controller(self):
        try:
            return ray.get_actor(CONTROLLER_NAME, namespace=CONTROLLER_NAMESPACE)
        except ValueError:
            return None  # serving without the loop (tests, or an operator who retrains by hand)

    # -- health --------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        async def loaded(name: str) -> str | None:
            try:
                handle = serve.get_deployment_handle(model_deployment_name(name), model_app_name(name))
                status = await asyncio.wait_for(handle.status.remote(), READY_TIMEOUT_S)
                return status["version"]
            except Exception:  # noqa: BLE001 - unreachable replica means not ready
                return None

        names = [m.name for m in self.cfg.models]
        versions = dict(zip(names, await asyncio.gather(*(loaded(n) for n in names)), strict=True))
        missing = sorted(n for n, v in versions.items() if v is None)
        if missing:
            return _error_response(NotReady(f"no production version loaded for {missing}"))
        return JSONResponse({"status": "ready", "models": versions})

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        body = await asyncio.to_thread(metrics.render, self.jobs, self._running_replicas, self._all_feedback_stats)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    def _all_feedback_stats(self) -> list[dict[str, Any]]:
        return [feedback_stats(m.name, self.feedback.read_all(m.name)) for m in self.cfg.models]

    def _running_replicas(self) -> dict[str, int]:
        apps = serve.status().applications
        out = {}
        for m in self.cfg.models:
            app_status = apps.get(model_app_name(m.name))
            deployment = app_status.deployments.get(model_deployment_name(m.name)) if app_status else None
            out[m.name] = deployment.replica_states.get("RUNNING", 0) if deployment else 0
        return out

    # -- models --------------------------------------------------------------------------
    def _summary(self, name: str) -> dict[str, Any]:
        m = self._model_cfg(name)
        state = self.registry.state(name)
        return {"name": m.name, "task": m.task, "labels": m.labels, "production": state.production,
                "canary": None, "shadow": None}

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return {"models": await asyncio.to_thread(lambda: [self._summary(m.name) for m in self.cfg.models])}

    @app.get("/v1/models/{model}")
    async def get_model(self, model: str) -> dict[str, Any]:
        def detail() -> dict[str, Any]:
            out = self._summary(model)
            out["versions"] = [
                {"version": v.version, "status": v.status, "parent": v.parent, "created_at": v.created_at,
                 "metrics": v.metrics.model_dump() if v.metrics else None,
                 "gate": v.gate.model_dump() if v.gate else None}
                for v in self.registry.versions(model)
            ]
            return out

        return await asyncio.to_thread(detail)

    # -- predictions ---------------------------------------------------------------------
    @app.post("/v1/models/{model}/predict")
    async def predict(self, model: str, body: PredictRequest) -> None:
        """Answered by the model's own replicas (serving/app.py); declared here for the
        OpenAPI schema, and reached only for a model that has no application."""
        self._model_cfg(model)
        raise NotReady(f"model {model!r} is not deployed yet")

    # -- feedback ------------------------------------------------------------------------
    @app.post("/v1/feedback", status_code=202)
    async def post_feedback(self, body: FeedbackRequest, request: Request) -> dict[str, str]:
        key_id = self.auth.check(request.headers.get("authorization"), "feedback")
        # Per key; clients without one (feedback opened in the config) share one bucket.
        self.feedback_limit.take(key_id or "anonymous")
        return await asyncio.to_thread(self._store_feedback, body, key_id)

    def _served(self, prediction_id: str) -> dict[str, Any]:
        """The logged prediction. Replicas write their log once per flush interval, so an
        id younger than that may not be on disk yet: wait out the interval, look again."""
        models = [m.name for m in self.cfg.models]
        served = self.predictions.lookup(models, prediction_id)
        born = prediction_time(prediction_id)
        if served is None and born is not None:
            settle = self.cfg.predictions.flush_interval_s + PREDICTION_LOG_SLACK_S
            wait = born.timestamp() + settle - time.time()
            if 0 < wait <= settle:
                time.sleep(wait)
                served = self.predictions.lookup(models, prediction_id)
        if served is None:
            hint = "" if self.cfg.predictions.sample_rate >= 1 else " (or it was not sampled into the log)"
            raise UnknownPrediction(prediction_id, hint)
        return served

    def _store_feedback(self, body: FeedbackRequest, key_id: str | None) -> dict[str, str]:
        if body.prediction_id is not None:
            served = self._served(body.prediction_id)
            model = self._model_cfg(served["model"])
            fields = {"text": served["text"], "prediction_id": served["prediction_id"],
                      "version": served["version"], "predicted_label": served["label"],
                      "predicted_at": served["created_at"]}
        else:
            model = self._model_cfg(body.model)
            check_text_length(body.text, "text", self.cfg.serving.max_chars_per_input)
            fields = {"text": body.text}
        if body.label not in model.labels:
            raise InvalidLabel(model.name, body.label, model.labels)
        feedback_id = self.feedback.append(model=model.name, label=body.label, key_id=key_id, **fields)
        metrics.FEEDBACK.labels(model.name).inc()
        controller = self._controller()
        if controller is not None:
            controller.record_feedback.remote(model.name)  # fire and forget: the trigger
        return {"feedback_id": feedback_id}

    # -- jobs ----------------------------------------------------------------------------
    @app.get("/v1/jobs/{job_id}")
    async def get_job(self, job_id: str) -> dict[str, Any]:
        job = await asyncio.to_thread(self.jobs.get, job_id)
        if job is None:
            raise UnknownJob(job_id)
        return job.model_dump(include={"job_id", "model", "state", "version", "metrics", "error"})

    # -- feedback statistics -------------------------------------------------------------
    @app.get("/v1/models/{model}/feedback/stats")
    async def get_feedback_stats(self, model: str, request: Request) -> dict[str, Any]:
        self.auth.check(request.headers.get("authorization"), "feedback")
        self._model_cfg(model)
        return await asyncio.to_thread(lambda: feedback_stats(model, self.feedback.read_all(model)))

    # -- admin ---------------------------------------------------------------------------
    @app.post("/v1/models/{model}/retrain", status_code=202)
    async def retrain(self, model: str, request: Request, body: EmptyRequest | None = None) -> dict[str, str]:
        key_id = self.auth.check(request.headers.get("authorization"), "admin")
        self._model_cfg(model)
        controller = self._controller()
        if controller is None:
            raise NotReady("retraining is not available here: no retrain controller is running")
        job_id = await controller.start.remote(model, f"manual (key {key_id})")
        if job_id is None:
            raise Conflict(f"a training job for {model!r} is already running")
        return {"job_id": job_id}

    @app.post("/v1/models/{model}/promote")
    async def promote(self, model: str, body: PromoteRequest, request: Request) -> dict[str, Any]:
        key_id = self.auth.check(request.headers.get("authorization"), "admin")
        self._model_cfg(model)

        def switch() -> dict[str, Any]:
            manifest = self.registry.manifest(model, body.version)  # 404 if unknown
            if manifest.status == "rejected" and not body.force:
                raise Conflict(f"{body.version} was rejected by the gate ({manifest.gate.reason if manifest.gate else ''});"
                               ' send "force": true to promote it anyway')
            return self._state_answer(model, self.registry.set_production(model, body.version, "promote",
                                                                          f"by key {key_id}"))

        return await asyncio.to_thread(switch)

    @app.post("/v1/models/{model}/rollback")
    async def rollback(self, model: str, request: Request, body: EmptyRequest | None = None) -> dict[str, Any]:
        key_id = self.auth.check(request.headers.get("authorization"), "admin")
        self._model_cfg(model)

        def switch() -> dict[str, Any]:
            target = self.registry.state(model).rollback_target()
            if target is None:
                raise Conflict(f"{model!r} has no earlier production version to roll back to")
            return self._state_answer(model, self.registry.set_production(model, target, "rollback",
                                                                          f"by key {key_id}"))

        return await asyncio.to_thread(switch)

    def _state_answer(self, model: str, state) -> dict[str, Any]:
        return {"model": model, "production": state.production, "canary": None, "shadow": None,
                "history": [h.model_dump() for h in state.history[-10:]]}

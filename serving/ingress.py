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
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneloop.core.config import TuneloopConfig
from tuneloop.core.names import CONTROLLER_NAMESPACE, controller_name
from tuneloop.core.errors import (
    Conflict,
    Forbidden,
    InvalidBody,
    MalformedJSON,
    MethodNotAllowed,
    NotFound,
    NotReady,
    StorageUnavailable,
    TuneloopError,
    UnknownJob,
    UnknownModel,
)
from tuneloop.store.jobs import JobStore
from tuneloop.core.auth import METRICS_ROLE, RateLimiter, single_header
from tuneloop.store.keys import KeyRing
from tuneloop.core.idempotency import HEADER as IDEMPOTENCY_HEADER
from tuneloop.core.idempotency import fingerprint, parse_key
from tuneloop.store.quarantine import QuarantineBook
from tuneloop.store.registry import Registry
from tuneloop.store.registry_state import BODY, RegistryState
from tuneloop.store.rollout_actions import operate_rollout
from tuneloop.store.storage import Storage
from tuneloop.serving import metrics
from tuneloop.serving.feedback_service import FeedbackService
from tuneloop.serving.fast_path import log_to_stderr
from tuneloop.serving.metric_files import cluster_metric_files, metrics_base, use_node_folder
from tuneloop.serving.responses import V1, error_response, internal_error_response
from tuneloop.core.names import (INGRESS_DEPLOYMENT, model_app_name, model_deployment_name, predict_route,
                                 running_replicas)
from tuneloop.core.tasks import model_task
from tuneloop.serving.api_bodies import EmptyRequest, FeedbackRequest, PredictRequest, PromoteRequest, RolloutRequest
from tuneloop.serving.body_guard import BodyGuard, TrailingSlash, unknown_model
from tuneloop.serving.predict_request import BodyBudget

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 5.0
CONTROLLER_LOOKUP_S = 5.0  # how long a retrain controller handle is trusted (Ingress._controller)

# A body without a Content-Type is JSON, as the model replicas read it (BodyGuard refuses any
# other type first): FastAPI's strict default left it unparsed, and feedback sent as
# requests' data=json.dumps(...) got a 422 "Input should be a valid dictionary".
# No 307 to the path without its trailing slash (TrailingSlash takes that path instead).
# No /docs or /redoc: their pages load Swagger UI and ReDoc from a CDN, which a cluster's
# network may not reach (a blank page); /openapi.json stays, the schema itself.
app = FastAPI(title="tuneloop", version="1", strict_content_type=False, redirect_slashes=False,
              docs_url=None, redoc_url=None)


def _authorization(request: Request) -> str | None:
    """The request's one Authorization header (two: a 400, ``single_header``)."""
    return single_header(request.headers.getlist("authorization"), "Authorization")


def _idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key (the routes' ``Header`` parameters only document it:
    FastAPI gives them the first of two headers, and two are refused here)."""
    return parse_key(request.headers.getlist(IDEMPOTENCY_HEADER))


def _request_id(key_id: str | None, action: str, idempotency_key: str | None,
                body: BaseModel | None = None) -> str | None:
    """An operator request's id in the registry's history: its key, what it asked, the
    client's Idempotency-Key (None without one: every call acts) and its body's fingerprint,
    so that the key reused for another version is refused (422) rather than answered with
    the first request's outcome and nothing done."""
    if idempotency_key is None:
        return None
    return f"{key_id} {action} {idempotency_key}{BODY}{fingerprint(body.model_dump() if body else {})[:16]}"


def _rollout_fields(state: RegistryState, shadow_percent: float) -> dict[str, Any]:
    """Production and, during a rollout, its challenger as ``shadow`` or ``canary``: its
    version and share (the percent of requests the canary answers, or of production's
    requests the shadow answers beside it), and the rollout itself."""
    r = state.rollout
    return {"production": state.production,
            "canary": {"version": r.version, "percent": r.percent} if r and r.stage == "canary" else None,
            "shadow": {"version": r.version, "percent": shadow_percent} if r and r.stage == "shadow" else None,
            "rollout": r.model_dump() if r else None}


@app.exception_handler(TuneloopError)
async def _tuneloop_error(_: Request, exc: TuneloopError) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(OSError)
async def _storage_error(_: Request, exc: OSError) -> JSONResponse:
    # The storage root out of reach (a bucket's outage, credentials gone, a full disk): a 503
    # that clients retry, not a 500 that many drop. What failed goes to the log.
    log.warning("storage error answering a request: %s: %s", type(exc).__name__, exc)
    return error_response(StorageUnavailable("the storage root cannot be read or written now; retry later"))


@app.exception_handler(Exception)
async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    # A job record that no longer validates, a bug: a JSON 500 as the model replicas
    # answer, not Starlette's plain text; the traceback goes to the log.
    log.error("unexpected error answering a request: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return internal_error_response()


def _unknown_model(request: Request) -> JSONResponse | None:
    """404 unknown_model for a path naming a model the config lacks: ``POST
    /v1/models/nosuch/predict`` with ``{}`` answered 422, and a GET 405."""
    model = unknown_model(request.url.path, BodyGuard.models)
    return None if model is None else error_response(UnknownModel(model))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    if (unknown := _unknown_model(request)) is not None:
        return unknown
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(MalformedJSON("the request body is not valid JSON"))
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        message = str(e.get("msg"))
        if e.get("type") == "value_error":  # a validator's own words, less pydantic's prefix and "body: "
            message, where = message.removeprefix("Value error, "), None if where == "body" else where
        parts.append(f"{where}: {message}" if where else message)
    return error_response(InvalidBody("; ".join(parts)))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 405 and (unknown := _unknown_model(request)) is not None:
        return unknown
    typed = {404: NotFound, 405: MethodNotAllowed}.get(exc.status_code)
    if typed is not None:
        # Starlette's own words ("Not Found", "Method Not Allowed") named neither the path
        # nor the method; predict's replicas say both.
        headers = dict(exc.headers or {})
        detail, allowed = str(exc.detail), headers.get("Allow")
        if allowed and "GET" in allowed.split(", ") and "HEAD" not in allowed.split(", "):
            allowed = headers["Allow"] = f"{allowed}, HEAD"  # its own route, after the GET's
        if detail == "Not Found":
            detail = f"no route {request.url.path!r}"
        elif detail == "Method Not Allowed" and allowed:
            detail = f"{request.method} is not allowed here; use {allowed}"
        answer = error_response(typed(detail))
        answer.headers.update(headers)  # a 405's Allow: the methods the path takes
        return answer
    return JSONResponse(V1.body("http_error", str(exc.detail)), status_code=exc.status_code)


app.add_middleware(BodyGuard)
app.add_middleware(TrailingSlash)  # added last: runs first, on every request


def readiness(answers: dict[str, tuple[str | None, dict[str, str]]]) -> JSONResponse:
    """``/readyz``'s answer from each model's (loaded version, {version it would not load: why})."""
    problems = {name: why for name, (_, why) in answers.items() if why}
    missing = sorted(name for name, (version, _) in answers.items() if version is None)
    if missing:
        reasons = "; ".join(f"{name} {version}: {why}" for name in missing
                            for version, why in problems.get(name, {}).items())
        return error_response(NotReady(f"no production version loaded for {missing}"
                                       + (f" ({reasons})" if reasons else "")))
    body: dict[str, Any] = {"status": "ready", "models": {name: version for name, (version, _) in answers.items()}}
    if problems:
        body["not_loaded"] = problems
    return JSONResponse(body)


# Requests the ingress holds at once: Serve's default, 5, let five clients without a key that
# send their bodies slowly (each held up to serving.body_timeout_s) stall feedback, /readyz,
# /metrics and every admin call behind them. Its handlers await (bodies, threads for storage),
# so hundreds cost little; past them, Serve queues up to INGRESS_MAX_QUEUED and then refuses.
INGRESS_MAX_ONGOING, INGRESS_MAX_QUEUED = 256, 1024


@serve.deployment(name=INGRESS_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=INGRESS_MAX_ONGOING, max_queued_requests=INGRESS_MAX_QUEUED)
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict):
        use_node_folder()  # first: before any metric value (serving/metric_files.py)
        log_to_stderr()
        self.cfg = TuneloopConfig.model_validate(config)
        storage = Storage(self.cfg.storage.root)
        self.registry = Registry(storage)
        self.quarantine = QuarantineBook(storage)
        self._controller_handle, self._controller_found_at = None, 0.0
        self.feedback = FeedbackService.from_config(self.cfg, trigger=self._trigger)
        self.jobs = JobStore(storage)
        self._renders: dict[bool, asyncio.Future] = {}  # /metrics' render under way, by whether it has feedback's series
        self.auth = KeyRing(self.cfg.auth, storage, background=True)
        self.feedback_limit = RateLimiter(self.cfg.auth.feedback_per_minute, self.cfg.auth.feedback_burst)
        BodyGuard.max_body_bytes = max(self.cfg.serving.max_body_bytes(), self.cfg.serving.max_feedback_body_bytes())
        BodyGuard.budget = BodyBudget(max(64 << 20, BodyGuard.max_body_bytes),
                                      "the ingress's: 64 MiB, or one largest body where that is more")
        BodyGuard.body_timeout_s = self.cfg.serving.body_timeout_s
        BodyGuard.models = frozenset(m.name for m in self.cfg.models)

    def __del__(self):
        self.auth.close()
        self.feedback.close()

    async def compact_feedback(self) -> int:
        """Called by a training job (through a handle) before it snapshots the feedback."""
        return await asyncio.to_thread(self.feedback.compact)

    def _model_cfg(self, name: str):
        try:
            return self.cfg.model(name)
        except KeyError:
            raise UnknownModel(name) from None

    def _holds(self, authorization: str | None, role: str) -> bool:
        """Whether the caller's key may act as ``role``, on a route that answers anyone
        (with more for such a key): no key (or an empty header) or a lower role is not, a
        key that is not valid a 401."""
        if not authorization:
            return False
        try:
            return self.auth.check(authorization, role) is not None
        except Forbidden:
            return False

    def _controller(self, fresh: bool = False):
        """The retrain controller's handle, kept for ``CONTROLLER_LOOKUP_S`` and then looked
        up again (or at once when ``fresh``): the trigger runs for every stored record,
        inside the feedback store's append lock, and a lookup is a round trip to Ray's GCS.
        Kept for good, a handle outlived its controller: when the keeper replaced a dead one,
        the triggers went to the dead actor and were dropped, and retraining never fired
        again. The new controller counts the compacted feedback files when it starts; records
        still in the journal then, or sent to the dead one in the seconds before the next
        lookup, count with the next job instead (they train with it all the same)."""
        now = time.monotonic()
        if fresh or self._controller_handle is None or now - self._controller_found_at > CONTROLLER_LOOKUP_S:
            try:
                self._controller_handle = ray.get_actor(controller_name(self.cfg.digest()),
                                                      namespace=CONTROLLER_NAMESPACE)
                self._controller_found_at = now
            except ValueError:
                self._controller_handle = None
                return None  # serving without the loop (tests, or an operator who retrains by hand)
        return self._controller_handle

    # -- health --------------------------------------------------------------------------
    # Every GET answers HEAD too (RFC 9110): load balancers' and uptime checkers' probes that
    # send it read a 405 as down. A route of its own, out of the schema: one route of both
    # gave the two operations one operationId, an invalid OpenAPI document. Declared after
    # the GET's, whose methods a 405's Allow lists (the path's first route).
    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.head("/readyz", include_in_schema=False)
    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """200 once every model has a version loaded; either way it names the versions a
        replica refused (labels other than the config's, and which) or failed to load, which
        before only a predict's 503 and the log said."""
        async def loaded(name: str) -> tuple[str | None, dict[str, str]]:
            try:
                handle = serve.get_deployment_handle(model_deployment_name(name), model_app_name(name))
                status = await asyncio.wait_for(handle.status.remote(), READY_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - unreachable replica means not ready
                return None, {}
            # A failed load's own text names paths and bucket keys, and /readyz needs no key.
            failed = {version: "did not load; the server's log says why" for version in status.get("failed", {})}
            return status["version"], {**failed, **status.get("refused", {})}

        names = [m.name for m in self.cfg.models]
        return readiness(dict(zip(names, await asyncio.gather(*(loaded(n) for n in names)), strict=True)))

    @app.head("/metrics", include_in_schema=False)
    @app.get("/metrics")
    async def prometheus(self, request: Request) -> Response:
        """Operational series for anyone who can reach the port; the series derived from
        feedback (online accuracy, labels) only for a key of role metrics, feedback or
        admin: Prometheus sends a metrics key as a bearer token (deploy/prometheus)."""
        with_feedback = self._holds(_authorization(request), METRICS_ROLE)
        return Response(await self._shared_render(with_feedback), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _shared_render(self, with_feedback: bool) -> bytes:
        """One render at a time per kind: a scrape arriving while one runs gets that one's
        text. Each render lists and reads every job record and manifest it names, and on a
        cluster asks every node for its files: a loop of anonymous scrapes ran them all at once."""
        rendering = self._renders.get(with_feedback)
        if rendering is None:
            stats = self.feedback.all_stats if with_feedback else None
            rendering = asyncio.ensure_future(asyncio.to_thread(self._render_metrics, stats))
            self._renders[with_feedback] = rendering
            rendering.add_done_callback(lambda _: self._renders.pop(with_feedback, None))
        return await asyncio.shield(rendering)

    def _render_metrics(self, stats) -> bytes:
        models = [m.name for m in self.cfg.models]
        base = metrics_base()
        if not base:  # one process (unit use)
            return metrics.render(self.jobs, self._running_replicas, self.registry, models, stats,
                                  shadow_percent=self.cfg.rollout.shadow_percent,
                                  min_replicas=self.cfg.serving.min_replicas)
        with cluster_metric_files(base) as files:  # every node's replicas
            return metrics.render(self.jobs, self._running_replicas, self.registry, models, stats, files,
                                  self.cfg.rollout.shadow_percent, self.cfg.serving.min_replicas)

    def _trigger(self, model: str, version: str | None, agreed: bool | None, prediction_id: str | None,
                 key_id: str | None) -> None:
        controller = self._controller()
        if controller is not None:  # fire and forget: the retrain trigger
            controller.record_feedback.remote(model, version, agreed, prediction_id, key_id)

    def _running_replicas(self) -> dict[str, int]:
        apps = serve.status().applications
        return {m.name: running_replicas(apps, m.name) for m in self.cfg.models}

    # -- models --------------------------------------------------------------------------
    def _summary(self, name: str) -> dict[str, Any]:
        m = self._model_cfg(name)
        state = self.registry.state(name)
        # The labels answers carry and feedback names, as entity types where a token
        # classifier's config lists BIO tags (B-PER was refused as feedback: "unknown type").
        return {"name": m.name, "task": m.task, "labels": model_task(m).label_names(),
                **_rollout_fields(state, self.cfg.rollout.shadow_percent)}

    # Who may read the models: whoever may predict (anyone, by default), as a client needs
    # the labels to read an answer; with predict closed (auth.open_roles: []), a key.
    @app.head("/v1/models", include_in_schema=False)
    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        self.auth.check(_authorization(request), "predict")
        return {"models": await asyncio.to_thread(lambda: [self._summary(m.name) for m in self.cfg.models])}

    @app.head("/v1/models/{model}", include_in_schema=False)
    @app.get("/v1/models/{model}")
    async def get_model(self, model: str, request: Request) -> dict[str, Any]:
        """Versions' evaluation metrics, gate reasons and the state's history are shown to
        admin keys only."""
        self.auth.check(_authorization(request), "predict")
        admin = self._holds(_authorization(request), "admin")

        def detail() -> dict[str, Any]:
            out = self._summary(model)
            if admin:  # who or what moved production and the rollout, with the numbers it saw
                out["history"] = [h.model_dump() for h in self.registry.state(model).history[-20:]]
            out["versions"] = []
            for v in self.registry.versions(model):
                summary = {"version": v.version, "status": v.status, "parent": v.parent, "created_at": v.created_at}
                if admin:
                    summary["metrics"] = v.metrics.model_dump() if v.metrics else None
                    summary["gate"] = v.gate.model_dump() if v.gate else None
                out["versions"].append(summary)
            return out

        return await asyncio.to_thread(detail)

    # -- predictions ---------------------------------------------------------------------
    @app.post("/v1/models/{model}/predict")
    async def predict(self, model: str, body: PredictRequest, request: Request) -> None:
        """Answered by the model's own replicas (serving/app.py); declared here for the
        OpenAPI schema, and reached only for a model that has no application, or by a path
        the proxy routes as written but which decodes to the route (``%70redict``)."""
        self._model_cfg(model)
        raw = (request.scope.get("raw_path") or b"").decode("latin-1")
        if raw and raw != predict_route(model):
            raise NotFound(f"send predictions to {predict_route(model)} as written, not percent-encoded ({raw!r})")
        raise NotReady(f"model {model!r} is not deployed yet")

    # -- feedback ------------------------------------------------------------------------
    @app.post("/v1/feedback", status_code=202)
    async def post_feedback(
        self, body: FeedbackRequest, request: Request,
        idempotency_key: str | None = Header(default=None, alias=IDEMPOTENCY_HEADER,
                                             description="retry with the same key: stored once, same answer"),
    ) -> dict[str, str]:
        key_id = self.auth.check(_authorization(request), "feedback")
        idempotency_key = _idempotency_key(request)
        # Per key; clients without one (feedback opened in the config) share one bucket. Their
        # address is no name: behind Serve's HAProxy every request comes from 127.0.0.1, whose
        # X-Forwarded-For uvicorn believes, so a client was whatever address it claimed.
        self.feedback_limit.take(key_id or "anonymous")
        feedback_id = await self.feedback.submit(body.task_fields(), prediction_id=body.prediction_id, model=body.model,
                                                 text=body.text, key_id=key_id, idempotency_key=idempotency_key)
        return {"feedback_id": feedback_id}

    # -- jobs ----------------------------------------------------------------------------
    @app.head("/v1/jobs/{job_id}", include_in_schema=False)
    @app.get("/v1/jobs/{job_id}")
    async def get_job(self, job_id: str, request: Request) -> dict[str, Any]:
        """Admins only: a job's record carries its error text and the gate's numbers."""
        self.auth.check(_authorization(request), "admin")
        job = await asyncio.to_thread(self.jobs.get, job_id)
        if job is None:
            raise UnknownJob(job_id)
        return job.model_dump(include={"job_id", "model", "state", "version", "promoted", "message", "metrics", "gate",
                                       "error"})

    # -- feedback statistics -------------------------------------------------------------
    @app.head("/v1/models/{model}/feedback/stats", include_in_schema=False)
    @app.get("/v1/models/{model}/feedback/stats")
    async def get_feedback_stats(self, model: str, request: Request) -> dict[str, Any]:
        self.auth.check(_authorization(request), "feedback")
        return self.feedback.stats(model)

    # -- admin ---------------------------------------------------------------------------
    @app.head("/v1/models/{model}/feedback/keys", include_in_schema=False)
    @app.get("/v1/models/{model}/feedback/keys")
    async def quarantined_keys(self, model: str, request: Request) -> dict[str, Any]:
        """Feedback keys the quarantine flagged for this model, with why and their numbers."""
        self.auth.check(_authorization(request), "admin")
        self._model_cfg(model)
        verdicts = await asyncio.to_thread(self.quarantine.verdicts, model)
        return {"model": model, "keys": [v.model_dump() for v in verdicts.values()]}

    @app.post("/v1/models/{model}/feedback/keys/{key_id}/release")
    async def release_key(self, model: str, key_id: str, request: Request,
                          body: EmptyRequest | None = None) -> dict[str, Any]:
        """Let a quarantined key's feedback be trained on, from the next job on. 404 when the
        key is not quarantined."""
        self.auth.check(_authorization(request), "admin")
        self._model_cfg(model)
        verdict = await asyncio.to_thread(self.quarantine.release, model, key_id)
        return {"model": model, **verdict.model_dump()}

    @app.post("/v1/models/{model}/retrain", status_code=202)
    async def retrain(self, model: str, request: Request, body: EmptyRequest | None = None) -> dict[str, str]:
        key_id = self.auth.check(_authorization(request), "admin")
        self._model_cfg(model)
        for looked_again in (False, True):  # a controller that died since the lookup: its keeper starts another
            controller = self._controller(fresh=looked_again)
            if controller is None:
                raise NotReady("the retrain controller is restarting; retry shortly" if looked_again
                               else "retraining is not available here: no retrain controller is running")
            try:
                job_id = await controller.start.remote(model, f"manual (key {key_id})")
                break
            except ray.exceptions.RayActorError:
                if looked_again:
                    raise NotReady("the retrain controller is restarting; retry shortly") from None
        if job_id is None:
            status = await controller.status.remote()
            if status["retiring"] and model not in status["running"]:  # a config change rolling the controller
                raise NotReady("the retrain controller is handing over to a new one; retry shortly")
            raise Conflict(f"a training job for {model!r} is already running")
        return {"job_id": job_id}

    # Production's moves take an Idempotency-Key too: a rollback retried after a timeout
    # stepped production back twice. The registry's history keeps each request's id.
    @app.post("/v1/models/{model}/promote")
    async def promote(self, model: str, body: PromoteRequest, request: Request,
                      idempotency_key: str | None = Header(default=None, alias=IDEMPOTENCY_HEADER)) -> dict[str, Any]:
        key_id = self.auth.check(_authorization(request), "admin")
        labels = self._model_cfg(model).labels
        state = await asyncio.to_thread(self.registry.promote, model, body.version, f"by key {key_id}",
                                        force=body.force, labels=labels,
                                        request=_request_id(key_id, "promote", _idempotency_key(request), body))
        return self._state_answer(model, state)

    @app.post("/v1/models/{model}/rollback")
    async def rollback(self, model: str, request: Request, body: EmptyRequest | None = None,
                       idempotency_key: str | None = Header(default=None, alias=IDEMPOTENCY_HEADER)) -> dict[str, Any]:
        key_id = self.auth.check(_authorization(request), "admin")
        self._model_cfg(model)
        state = await asyncio.to_thread(self.registry.rollback, model, f"by key {key_id}",  # 409: nothing earlier
                                        request=_request_id(key_id, "rollback", _idempotency_key(request)),
                                        labels=self._model_cfg(model).labels)
        return self._state_answer(model, state)

    @app.post("/v1/models/{model}/rollout")
    async def rollout(self, model: str, body: RolloutRequest, request: Request,
                      idempotency_key: str | None = Header(default=None, alias=IDEMPOTENCY_HEADER)) -> dict[str, Any]:
        key_id = self.auth.check(_authorization(request), "admin")
        m = self._model_cfg(model)
        state = await asyncio.to_thread(operate_rollout, self.registry, model, body.action, f"by key {key_id}",
                                        self.cfg.rollout, m.labels, body.version, body.stage, body.force,
                                        _request_id(key_id, "rollout", _idempotency_key(request), body),
                                        logs_predictions=self.cfg.predictions.sample_rate > 0, at=body.at)
        return self._state_answer(model, state)

    def _state_answer(self, model: str, state: RegistryState) -> dict[str, Any]:
        return {"model": model, **_rollout_fields(state, self.cfg.rollout.shadow_percent),
                "history": [h.model_dump() for h in state.history[-10:]]}


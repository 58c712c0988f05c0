"""The ingress's ASGI middleware. ``BodyGuard``: the ingress reads every request body itself
before FastAPI does, with the limits the model replicas apply to theirs
(``predict_request.py``). ``TrailingSlash``: a path with a trailing slash is the path without
it, as a model replica reads predict's.
"""

from __future__ import annotations

from starlette.routing import Match

from tuneloop.core.auth import single_header
from tuneloop.core.errors import TuneloopError, UnknownModel
from tuneloop.serving.predict_request import (BodyBudget, check_content_encoding, check_content_length,
                                              check_content_type, load_json, read_body)
from tuneloop.serving.responses import error_response


class BodyGuard:
    """Every body is read here first, as the model replicas read theirs: capped while it
    arrives (413), within ``body_timeout_s`` (408), and parsed once to refuse JSON nested
    beyond what the parser can take (422), before FastAPI sees it. A plain ASGI middleware:
    Starlette's ``BaseHTTPMiddleware`` cannot hand a body it has read on to the app.

    The limits are class attributes, set by ``Ingress.__init__``: Serve serves a pickled
    copy of the FastAPI app and pickles the ingress class by value, so ``app.state`` set
    there never reaches the app that answers; this class is imported by reference."""

    max_body_bytes = 1 << 20
    body_timeout_s = 10.0
    # The configured models: a body refused on a path naming another (malformed JSON, a media
    # type) is that path's 404 unknown_model, as FastAPI's own refusals are (ingress.py).
    models: frozenset[str] | None = None
    # The bodies held at once, whoever sends them (it reads before any key is checked): up
    # to INGRESS_MAX_ONGOING slow senders of predict-sized bodies held 376 MiB by default.
    budget = BodyBudget(64 << 20)

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH") or not _routed(scope):
            return await self.app(scope, receive, send)
        headers: dict[str, list[str]] = {}  # every value of each, in order
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1").lower(), []).append(v.decode("latin-1"))
        limit = self.max_body_bytes

        async def chunks():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                yield message.get("body", b"")
                if not message.get("more_body"):
                    return

        try:
            check_content_type(single_header(headers.get("content-type", []), "Content-Type"))
            check_content_encoding(headers.get("content-encoding", []))
            check_content_length((headers.get("content-length") or [None])[-1], limit)
            body = await read_body(chunks(), limit, self.body_timeout_s, self.budget)
        except TuneloopError as e:
            return await error_response(self._unknown_model(scope["path"]) or e)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:  # held until answered, whatever the answer
            try:
                if body.strip():
                    load_json(body)
            except TuneloopError as e:
                return await error_response(self._unknown_model(scope["path"]) or e)(scope, receive, send)
            await self.app(scope, replay, send)
        finally:
            self.budget.give(len(body))

    @classmethod
    def _unknown_model(cls, path: str) -> UnknownModel | None:
        return UnknownModel(model) if (model := unknown_model(path, cls.models)) is not None else None


def _routed(scope) -> bool:
    """Whether a route of the app takes this method on this path: FastAPI answers the rest
    404 or 405, which reading the body first answered 415 or 400 (a PUT of text to /healthz,
    a POST to a path no route has)."""
    routes = getattr(getattr(scope.get("app"), "router", None), "routes", None)
    return routes is None or any(route.matches(scope)[0] == Match.FULL for route in routes)


def unknown_model(path: str, models: frozenset[str] | None) -> str | None:
    """The model a ``/v1/models/<model>/...`` path names, if it is not one of ``models``."""
    parts = path.rstrip("/").split("/")
    if len(parts) < 4 or parts[1:3] != ["v1", "models"] or models is None or not parts[3] or parts[3] in models:
        return None  # an empty segment (/v1/models//predict) names no model: no route
    return parts[3]


class TrailingSlash:
    """``/v1/feedback/`` is ``/v1/feedback``, as ``/v1/models/m/predict/`` is predict: the
    model replicas (HAProxy routes predict to them by prefix) take either, and a client
    should not find that one route takes a slash and the next answers 404. Not FastAPI's
    ``redirect_slashes``: its 307 has an empty body and an absolute ``http://`` location,
    wrong behind a TLS proxy, and a client re-sends a POST's body to it or not."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
            if scope.get("raw_path"):  # predict's route compares the path as sent
                scope["raw_path"] = scope["raw_path"].rstrip(b"/") or b"/"
        return await self.app(scope, receive, send)

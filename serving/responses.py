"""The one place a TuneloopError becomes an HTTP answer, for the ingress and the model
replicas alike: DESIGN.md's ``{"error": {"code", "message"}}`` with the error's status and
headers (``Retry-After``, ``WWW-Authenticate``). Errors that are not TuneloopErrors are our
own bugs: logged where they happen, answered 500 ``internal`` without details."""

from __future__ import annotations

from starlette.responses import JSONResponse

from tuneloop.core.errors import TuneloopError

INTERNAL = {"error": {"code": "internal", "message": "internal error; see the server log"}}


def error_response(exc: TuneloopError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def internal_error_response() -> JSONResponse:
    return JSONResponse(INTERNAL, status_code=500)

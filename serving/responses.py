"""The one place a TuneloopError becomes an HTTP answer, for the ingress and the model
replicas alike, in the answer format of a protocol: DESIGN.md's v1, ``{"error": {"code",
"message"}}``, with the error's status and headers (``Retry-After``, ``WWW-Authenticate``).
A second protocol (KServe's v2, OpenAI's) is one more ``ErrorFormat``: the typed errors,
their statuses and where they are raised stay as they are. Errors that are not
TuneloopErrors are our own bugs: logged where they happen, answered 500 without details."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from tuneloop.core.errors import TuneloopError

INTERNAL_CODE, INTERNAL_MESSAGE = "internal", "internal error; see the server log"


@dataclass(frozen=True)
class ErrorFormat:
    """How a protocol writes an error: ``body(code, message)`` -> the JSON document."""

    name: str
    body: Callable[[str, str], dict[str, Any]]


V1 = ErrorFormat("v1", lambda code, message: {"error": {"code": code, "message": message}})


MAX_MESSAGE_CHARS = 2000  # an error quoting a 1 MB label answered 1 MB


def error_response(exc: TuneloopError, protocol: ErrorFormat = V1) -> JSONResponse:
    # A message may quote what the client sent, a lone surrogate too, which UTF-8 cannot
    # encode: the answer would fail inside the error handler (a plain-text 500).
    message = exc.message.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(message) > MAX_MESSAGE_CHARS:  # a quoted label or id may be as long as the body
        message = f"{message[:MAX_MESSAGE_CHARS]}… ({len(message)} characters)"
    return JSONResponse(protocol.body(exc.code, message), status_code=exc.status, headers=exc.headers)


def internal_error_response(protocol: ErrorFormat = V1) -> JSONResponse:
    return JSONResponse(protocol.body(INTERNAL_CODE, INTERNAL_MESSAGE), status_code=500)

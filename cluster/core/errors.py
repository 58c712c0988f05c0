"""Typed errors that reach clients, each with its HTTP status and machine code.

The mapping to HTTP statuses lives here, in one place; ``serving/responses.py`` writes any
of these in a protocol's error format (v1: ``{"error": {"code", "message"}}``).
"""

from __future__ import annotations

import math


def quoted(value: object, limit: int = 80) -> str:
    """``value`` as a message quotes it, cut at ``limit`` characters: a client's 100,000-
    character prediction id came back whole in its 404."""
    text = str(value)
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


_JSON_TYPES = {"NoneType": "null", "str": "a string", "int": "a number", "float": "a number", "bool": "a boolean",
               "list": "an array", "dict": "an object"}


def json_type(value: object) -> str:
    """What a client sent, in JSON's words: "not NoneType" named Python's type of a null."""
    return _JSON_TYPES.get(type(value).__name__, type(value).__name__)


class TuneloopError(Exception):
    status: int = 400
    code: str = "bad_request"
    headers: dict[str, str] | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(TuneloopError):
    status, code = 400, "invalid_request"


class MalformedJSON(TuneloopError):
    status, code = 400, "malformed_json"


class InvalidBody(TuneloopError):
    """A well-formed JSON body of the wrong shape (what a schema would reject)."""

    status, code = 422, "invalid_request"


class InvalidValue(TuneloopError):
    status, code = 422, "invalid_value"


class InputRejected(TuneloopError):
    """An input the tokenizer or model cannot take (found by running it alone)."""

    status, code = 422, "invalid_input"


class NonFiniteScores(InputRejected):
    """The model scored an input as NaN or infinity: answered as the input's 422 (its batch
    mates are fine), but a fault of the version too, which a rollout's health counts."""


class RequestTimeout(TuneloopError):
    """The client sent its body too slowly."""

    status, code = 408, "request_timeout"


class UnsupportedMediaType(TuneloopError):
    status, code = 415, "unsupported_media_type"


class NotFound(TuneloopError):
    status, code = 404, "not_found"


class MethodNotAllowed(TuneloopError):
    status, code = 405, "method_not_allowed"


class PayloadTooLarge(TuneloopError):
    status, code = 413, "payload_too_large"


class UnknownModel(TuneloopError):
    status, code = 404, "unknown_model"

    def __init__(self, model: str):
        super().__init__(f"no model named {quoted(model)}")


class UnknownVersion(TuneloopError):
    status, code = 404, "unknown_version"

    def __init__(self, model: str, version: str):
        hint = (f"; versions are named v1, v2, ...: did you mean 'v{version}'?"
                if str(version).isdigit() and len(str(version)) < 10 else "")
        super().__init__(f"model {quoted(model)} has no version {quoted(version)}{hint}")


class UnknownPrediction(TuneloopError):
    status, code = 404, "unknown_prediction"

    def __init__(self, prediction_id: str, hint: str = ""):
        super().__init__(f"no prediction with id {quoted(prediction_id)}{hint}")


class UnknownJob(TuneloopError):
    status, code = 404, "unknown_job"

    def __init__(self, job_id: str):
        super().__init__(f"no training job with id {quoted(job_id)}")


class NotQuarantined(TuneloopError):
    status, code = 404, "not_quarantined"

    def __init__(self, model: str, key_id: str):
        super().__init__(f"key {quoted(key_id)} is not quarantined for model {quoted(model)}")


class InvalidLabel(TuneloopError):
    status, code = 422, "invalid_label"

    def __init__(self, model: str, label: str, labels: list[str]):
        super().__init__(f"label {quoted(label)} is not one of model {quoted(model)}'s labels {labels}")


class Unauthorized(TuneloopError):
    status, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(TuneloopError):
    status, code = 403, "forbidden"


class Conflict(TuneloopError):
    status, code = 409, "conflict"


class RateLimited(TuneloopError):
    status, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}


class Overloaded(TuneloopError):
    """The model's queue is full or the request ran past its timeout: retry shortly."""

    status, code = 503, "overloaded"
    headers = {"Retry-After": "1"}


class TimedOut(Overloaded):
    """The request ran past ``serving.request_timeout_s`` in the version it was routed to:
    to a client, an overload (retry); to the metrics, that version's timeout (a hung model
    is no traffic to scale out for)."""

    def __init__(self, message: str, version: str):
        super().__init__(message)
        self.version = version


class StorageUnavailable(TuneloopError):
    """A write could not be made durable (disk full, I/O error): nothing was stored."""

    status, code = 503, "storage_unavailable"
    headers = {"Retry-After": "5"}


class CorruptStoredFile(TuneloopError):
    """A file of the storage root (registry state, a manifest) that tuneloop cannot read:
    cut, or edited by hand. Nothing is served from it until an operator restores it."""

    status, code = 503, "corrupt_stored_file"
    headers = {"Retry-After": "30"}  # an operator restores the file; a 503 says when to look again

    def __init__(self, path: str, why: str):
        where = ("a backup (the bucket's versioning)" if path.endswith("state.json") else
                 "a backup, or the registry's history in state.json")
        super().__init__(f"{path} is not a file tuneloop can read ({why}): restore it from {where}")


class NotReady(TuneloopError):
    status, code = 503, "not_ready"
    headers = {"Retry-After": "5"}


class KeyStoreUnavailable(TuneloopError):
    """The API keys cannot be read (a corrupt or unreadable key file) and none were loaded
    before, so a request that needs a key cannot be checked: retry once it is fixed."""

    status, code = 503, "auth_unavailable"
    headers = {"Retry-After": "5"}

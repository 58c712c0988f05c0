"""Parsing and checking one predict request body. Pure: no Ray, no torch, no web framework.

The model replica answers predict requests itself (see ``serving/app.py``), without FastAPI,
so the checks that FastAPI and pydantic make for the other endpoints are made here, with
the same errors: 415 for a body that is not JSON, 413 past the size limits (counted while
the body is read), 408 for a body sent too slowly, 400 for malformed JSON, 422 for a body
of the wrong shape or nested too deeply. What the ``inputs`` may hold is the model's task's
rule (``Task.check_inputs``). The ingress reads its bodies through the same ``read_body``
and ``load_json``.
"""

from __future__ import annotations

import asyncio
import email.message
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tuneloop.core.config import ServingConfig
from tuneloop.core.tasks import Task
from tuneloop.core.errors import (
    InvalidBody,
    InvalidRequest,
    MalformedJSON,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    json_type,
    quoted,
)


@dataclass(frozen=True)
class PredictLimits:
    max_inputs: int
    max_chars: int
    max_body_bytes: int

    @classmethod
    def from_config(cls, s: ServingConfig) -> PredictLimits:
        return cls(s.max_inputs_per_request, s.max_chars_per_input, s.max_body_bytes())


def check_content_type(content_type: str | None) -> None:
    """JSON, or no type (read as JSON), as FastAPI tells them apart (``email.message``'s
    parse: ``application/a/b+json`` is no JSON type to it, and passed here, it answered
    422 "Input should be a valid dictionary" for a valid body, not 415)."""
    if not content_type:
        return
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    if message.get_content_maintype() != "application" or not (subtype == "json" or subtype.endswith("+json")):
        ctype = content_type.split(";")[0].strip().lower()
        raise UnsupportedMediaType(f"send JSON with Content-Type: application/json, not {ctype!r}")


def check_content_encoding(encodings: list[str]) -> None:
    """Refuse a compressed body (415): read as it came, a gzipped JSON body answered 400
    "not valid JSON", and another encoding's bytes were parsed raw."""
    named = [e.strip().lower() for value in encodings for e in value.split(",") if e.strip()]
    if any(e != "identity" for e in named):
        raise UnsupportedMediaType(f"Content-Encoding {', '.join(named)!r} is not taken: send the body uncompressed")


def check_content_length(content_length: str | None, limit: int) -> None:
    """Refuse an oversized body from its header, before reading it."""
    if content_length is None:
        return
    if not (content_length.isascii() and content_length.isdigit() and len(content_length) <= 19):
        raise InvalidRequest(f"bad Content-Length {content_length!r}")
    if int(content_length) > limit:
        raise PayloadTooLarge(f"request body of {content_length} bytes exceeds {limit}")


class BodyBudget:
    """The request bytes a replica holds at once (``serving.max_body_bytes_in_flight``): one
    body's limit times the requests Serve lets a replica take (5 batches and its queue,
    1,184 by default) let 114 MiB bodies add up to 132 GiB. Taken while a body arrives,
    given back when its request is answered; one event loop, so no lock."""

    def __init__(self, limit: int, source: str = "serving.max_body_bytes_in_flight"):
        self.limit, self.held, self.source = limit, 0, source  # source: what sets the limit, for the 503

    def take(self, n: int) -> None:
        if self.held + n > self.limit:
            raise Overloaded(f"this replica holds {self.held} bytes of requests, its limit "
                             f"{self.limit} ({self.source}); retry shortly")
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n


async def read_body(chunks: AsyncIterator[bytes], limit: int, timeout_s: float,
                    budget: BodyBudget | None = None) -> bytes:
    """The request body, counted while it arrives: past ``limit`` bytes it is refused at
    once (413), so a chunked body with no Content-Length cannot fill a replica's memory,
    and a sender slower than ``timeout_s`` for the whole body gets a 408. With ``budget``,
    its bytes are taken from it as they arrive (a 503 past it); the caller gives back
    ``len(body)`` once the request is answered, and nothing if this raises."""
    body = bytearray()

    async def collect() -> bytes:
        async for chunk in chunks:
            if len(body) + len(chunk) > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
            if budget is not None:
                budget.take(len(chunk))
            body.extend(chunk)
        return bytes(body)

    try:
        try:
            return await asyncio.wait_for(collect(), timeout_s)
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {timeout_s:g}s") from None
    except BaseException:
        if budget is not None:
            budget.give(len(body))
        raise


# No body of the API nests deeper than 4 (feedback's entities: object, list, object, value).
# A fixed bound, not the parser's recursion limit: that depends on the stack the parse runs
# on, and bodies about 965 deep passed the ingress's check, then failed FastAPI's (a 400).
MAX_JSON_DEPTH = 64


def load_json(body: bytes):
    """Parse JSON; a body nested deeper than MAX_JSON_DEPTH is a client error (422), not
    a RecursionError deep inside the server."""
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MalformedJSON("the request body is not valid JSON") from None
    except ValueError:  # valid JSON Python will not convert: an integer over 4,300 digits
        # Python's own words advised the client to call sys.set_int_max_str_digits().
        raise InvalidBody("the JSON body holds a number too long to read (more than 4,300 digits)") from None
    except RecursionError:
        doc = None
    else:
        # Nesting needs as many opening brackets: a body with few is not walked (C-speed count).
        if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH or not _deeper_than(doc, MAX_JSON_DEPTH):
            return doc
    raise InvalidBody(f"the JSON body is nested too deeply (more than {MAX_JSON_DEPTH} levels)")


def _deeper_than(doc, limit: int) -> bool:
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return True
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return False


def parse_predict_body(body: bytes, limits: PredictLimits, task: Task) -> list[str]:
    """``{"inputs": [...]}`` -> the inputs as the model's task checks them (texts), or the
    TuneloopError that says why not."""
    if len(body) > limits.max_body_bytes:
        raise PayloadTooLarge(f"request body of {len(body)} bytes exceeds {limits.max_body_bytes}")
    doc = load_json(body)
    if not isinstance(doc, dict):
        raise InvalidBody(f'the body must be a JSON object {{"inputs": [...]}}, not {json_type(doc)}')
    extra = sorted(set(doc) - {"inputs"})
    if extra:
        raise InvalidBody(f"unknown field(s) {', '.join(quoted(f) for f in extra[:5])}"
                          f"{f' and {len(extra) - 5} more' if len(extra) > 5 else ''}; the body takes only \"inputs\"")
    if "inputs" not in doc:
        raise InvalidBody('"inputs" is required: a list of texts')
    return task.check_inputs(doc["inputs"], limits.max_inputs, limits.max_chars)

"""``Idempotency-Key`` on ``POST /v1/feedback``, after the IETF draft
(draft-ietf-httpapi-idempotency-key-header): a client that retries a request with the same
key gets the first answer again and nothing is stored twice.

- The key is scoped by the API key that sent it, so two clients cannot collide, or probe
  each other's keys. Clients without an API key (where ``auth.open_roles`` opens feedback)
  cannot be told apart: their keys are scoped by the request too, so one client's key is
  never refused or answered for another's different request.
- A key reused with a *different* request is refused (422), as the draft asks (for a client
  with an API key: without one, a different request is a new one).
- Keys are remembered for ``ttl_s`` (24 h by default): the index is rebuilt from the stored
  records when the writer starts, so a retry after a restart is recognised too. Every record
  carries its key, so the index is derived state, never the only copy.

Pure: no Ray, no torch, no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from tuneloop.core.auth import single_header
from tuneloop.core.errors import InvalidRequest, InvalidValue

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255
_KEY = re.compile(r"^[\x21-\x7e]+\Z")  # visible ASCII


def parse_key(headers: list[str]) -> str | None:
    """The key from the request's ``Idempotency-Key`` headers (every one it carried): an
    sf-string (``"abc"``, as the draft writes it) or a bare token; None when absent. Raises
    InvalidRequest (400) for anything else, two headers included (``single_header``)."""
    header = single_header(headers, HEADER)
    if header is None:
        return None
    value = header.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not value or len(value) > MAX_KEY_CHARS or not _KEY.match(value):
        raise InvalidRequest(f"{HEADER} must be 1-{MAX_KEY_CHARS} visible ASCII characters")
    return value


def fingerprint(request: dict[str, Any]) -> str:
    """What makes two requests 'the same': their fields, canonically serialised."""
    fields = {k: v for k, v in sorted(request.items()) if v is not None}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


@dataclass(frozen=True)
class Seen:
    fingerprint: str
    feedback_id: str
    at: datetime


class IdempotencyIndex:
    def __init__(self, ttl_s: float = 86_400.0):
        self.ttl = timedelta(seconds=ttl_s)
        self._seen: dict[tuple[str, str], Seen] = {}

    @staticmethod
    def _scope(key_id: str | None, request_fingerprint: str) -> str:
        return key_id or f"anonymous {request_fingerprint}"

    def answer(self, key_id: str | None, key: str, request_fingerprint: str) -> str | None:
        """The feedback id already stored for this key and request, or None if the key is
        new. Raises InvalidValue (422) for the key reused with another request."""
        seen = self._seen.get((self._scope(key_id, request_fingerprint), key))
        if seen is None:
            return None
        if seen.fingerprint != request_fingerprint:
            raise InvalidValue(f"{HEADER} {key!r} was used for a different request; use a new key per request")
        return seen.feedback_id

    def remember(self, key_id: str | None, key: str, request_fingerprint: str, feedback_id: str,
                 at: datetime) -> None:
        self._seen[(self._scope(key_id, request_fingerprint), key)] = Seen(request_fingerprint, feedback_id, at)

    def forget_before(self, now: datetime) -> int:
        """Drop keys older than the TTL; returns how many went."""
        cutoff = now - self.ttl
        old = [k for k, seen in self._seen.items() if seen.at < cutoff]
        for k in old:
            del self._seen[k]
        return len(old)

    def __len__(self) -> int:
        return len(self._seen)

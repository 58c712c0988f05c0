"""API keys, roles and the feedback rate limit: the rules. Pure: no Ray, no web framework, no
I/O (the key file is read and written by ``tuneloop.store.keys``).

A key reads ``tl_<id>_<secret>``. Only its id and the SHA-256 of its secret are ever stored
(keys are 128 random bits, so a fast hash is as safe as a slow one), and the secret is
compared in constant time. Keys come from three places, all merged:

- the config: ``auth.keys: [{id, role, sha256}]``;
- the environment: ``TUNELOOP_API_KEYS="admin:tl_...,feedback:tl_..."``;
- ``<storage>/auth/keys.json``, where ``tuneloop run`` keeps the admin key it creates on
  first run (the key itself goes to ``auth/admin-key.txt``, 0600, never to the logs) and
  ``tuneloop keys create`` / ``keys revoke`` add and remove keys, under ``auth/keys.lock``.

Roles are ranked: ``admin`` may do everything, ``feedback`` may also predict, ``predict``
only predicts. A role listed in ``auth.open_roles``, and every role below it, needs no key
(``predict`` by default). One role stands apart: ``metrics`` only reads /metrics' series
derived from feedback (as ``feedback`` and ``admin`` may), the key Prometheus scrapes with;
a leaked scrape key then cannot send feedback that trains the next version.

A key file that cannot be read or has the wrong shape raises KeyFileError, whose message
names the file and the problem, never a secret: ``tuneloop run`` refuses to start on it,
and a running server keeps its last good keys (see KeyRing).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tuneloop.core.config import ConfigError
from tuneloop.core.errors import Forbidden, InvalidRequest, RateLimited, Unauthorized

log = logging.getLogger("tuneloop")

ROLES = ("predict", "feedback", "admin")  # ranked: each may do what those before it may
METRICS_ROLE = "metrics"  # reads /metrics' feedback-derived series, nothing else
KEY_ROLES = (*ROLES, METRICS_ROLE)
KEYS_ENV = "TUNELOOP_API_KEYS"
KEYS_FILE = "auth/keys.json"
ADMIN_KEY_FILE = "auth/admin-key.txt"
_KEY = re.compile(r"^tl_([0-9a-f]{8})_([0-9a-f]{32})\Z")
ID_PATTERN = re.compile(r"^[0-9a-f]{8}\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


class KeyFileError(ConfigError):
    """The key file cannot be read or has the wrong shape; the message says which file and
    what is wrong, never a secret."""


class RevokeError(ValueError):
    """A key that `tuneloop keys revoke` cannot remove from the key file; the message says why."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    role: str
    sha256: str


def new_key(role: str) -> tuple[str, ApiKey]:
    """A fresh key: the secret to hand out once, and what is stored of it."""
    key_id, secret = secrets.token_hex(4), secrets.token_hex(16)
    return f"tl_{key_id}_{secret}", ApiKey(key_id, role, _hash(secret))


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def single_header(values: list[str], name: str) -> str | None:
    """The one ``name`` header of a request (``values``: every one it carried), None without
    one. Two are a 400: which of them counts is a guess, and the first won, so an admin
    key sent beside a metrics key acted as admin (and a retry's Idempotency-Key was matched
    on a key the client may not have meant)."""
    if len(values) > 1:
        raise InvalidRequest(f"send one {name} header, not {len(values)}")
    return values[0] if values else None


def quote_value(value: Any) -> str:
    """A bad value, as an error may show it: a short string or a number as it is; a longer
    string, which could be a pasted key (its secret has 32 characters), by its length only."""
    if value is None:
        return "nothing"
    if isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 16):
        return repr(value)
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    return "a JSON object" if isinstance(value, dict) else "a JSON array"


def keys_from_env(value: str | None) -> list[ApiKey]:
    """``role:key,role:key`` -> keys; raises ConfigError naming a bad entry (never a secret)."""
    out = []
    for n, entry in enumerate(filter(None, (e.strip() for e in (value or "").split(","))), 1):
        role, _, key = entry.partition(":")
        match = _KEY.match(key)
        if role not in KEY_ROLES or not match:
            raise ConfigError(f"{KEYS_ENV}: entry {n} must read <role>:tl_<8 hex>_<32 hex> with role in {KEY_ROLES}")
        out.append(ApiKey(match.group(1), role, _hash(match.group(2))))
    return out


def stored_keys_doc(keys: Iterable[ApiKey]) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return {"keys": [{"id": k.id, "role": k.role, "sha256": k.sha256, "created_at": now} for k in keys]}


def keys_from_doc(doc: Any, source: str = KEYS_FILE) -> list[ApiKey]:
    """The keys of a parsed key file (None: no file, no keys). Every entry is checked, so a
    hand-edited file fails here, naming ``source`` and the entry, not in every request."""
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise KeyFileError(f'{source}: must be a JSON object {{"keys": [...]}}, not {quote_value(doc)}')
    if not isinstance(doc.get("keys"), list):
        raise KeyFileError(f'{source}: "keys" must be a JSON array, not {quote_value(doc.get("keys"))}')
    out = []
    for n, entry in enumerate(doc["keys"]):
        where = f"{source}: keys[{n}]"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{where} must be a JSON object {{id, role, sha256}}, not {quote_value(entry)}")
        key_id, role, sha256 = entry.get("id"), entry.get("role"), entry.get("sha256")
        sha256 = sha256.lower() if isinstance(sha256, str) else sha256  # as the config takes it: any case
        if not (isinstance(key_id, str) and ID_PATTERN.match(key_id)):
            raise KeyFileError(f"{where}: id must be 8 hex digits, not {quote_value(key_id)}")
        if not (isinstance(role, str) and role in KEY_ROLES):
            raise KeyFileError(f"{where} (id {key_id}): role must be one of {list(KEY_ROLES)}, not {quote_value(role)}")
        if not (isinstance(sha256, str) and _SHA256.match(sha256)):
            raise KeyFileError(f"{where} (id {key_id}): sha256 must be 64 hex digits, not {quote_value(sha256)}")
        out.append(ApiKey(key_id, role, sha256))
    return out


def without_key(doc: dict[str, Any], key_id: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A (checked) key file document without the entry of ``key_id``, and that entry (None
    if it holds no such id). Pure: the caller reads and writes the file, under its lock."""
    removed = next((k for k in doc["keys"] if k["id"] == key_id), None)
    return {**doc, "keys": [k for k in doc["keys"] if k["id"] != key_id]}, removed


@dataclass
class Authorizer:
    keys: list[ApiKey]
    open_roles: frozenset[str] = field(default_factory=lambda: frozenset({"predict"}))

    def __post_init__(self):
        self._by_id = {k.id: k for k in self.keys}
        # An open role opens those ranked below it, as a key's role does: `open_roles:
        # [feedback]` left predicting behind a key while anyone could send feedback.
        top = max((ROLES.index(r) for r in self.open_roles), default=-1)
        self.open_roles = frozenset(ROLES[: top + 1])

    def check(self, authorization: str | None, role: str) -> str | None:
        """The id of the key that may act as ``role``; None for an open role without a key.
        Raises Unauthorized (no or bad key) or Forbidden (a key whose role ranks lower)."""
        if not authorization:
            if role in self.open_roles:
                return None
            raise Unauthorized(f"this needs an API key with role {role!r}: send Authorization: Bearer <key>")
        scheme, _, token = authorization.partition(" ")
        match = _KEY.match(token.strip()) if scheme.lower() == "bearer" else None
        key = self._by_id.get(match.group(1)) if match else None
        # Compare even for an unknown id, so timing does not tell which ids exist.
        ok = hmac.compare_digest(_hash(match.group(2)) if match else "", key.sha256 if key else _DUMMY_HASH)
        if key is None or not ok:
            raise Unauthorized("the API key is not valid")
        if not grants(key.role, role) and role not in self.open_roles:
            raise Forbidden(f"key {key.id} has role {key.role!r}; this needs {role!r}")
        return key.id


def grants(key_role: str, role: str) -> bool:
    """Whether a key of ``key_role`` may act as ``role``."""
    if role == METRICS_ROLE:
        return key_role in (METRICS_ROLE, "feedback", "admin")
    if key_role == METRICS_ROLE:
        return False
    return ROLES.index(key_role) >= ROLES.index(role)


class RateLimiter:
    """A token bucket per key: ``per_minute`` sustained, ``burst`` at once."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = per_minute / 60.0, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}

    MAX_BUCKETS = 4096  # past it, buckets that have refilled are forgotten (a new one starts full)

    def take(self, key: str) -> None:
        now = self.clock()
        if len(self._buckets) > self.MAX_BUCKETS:
            self._buckets = {k: (t, at) for k, (t, at) in self._buckets.items()
                             if t + (now - at) * self.rate < self.burst}
            if len(self._buckets) > self.MAX_BUCKETS // 2:  # many clients draining at once: the
                # least recently seen half goes too, so a sweep comes at most every 2048 takes
                self._buckets = dict(list(self._buckets.items())[-(self.MAX_BUCKETS // 2):])
        tokens, last = self._buckets.pop(key, (float(self.burst), now))  # re-added last: recently seen
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            raise RateLimited(f"feedback rate limit for {key!r} reached; retry in {wait:.1f}s", retry_after=wait)
        self._buckets[key] = (tokens - 1.0, now)

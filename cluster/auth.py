"""API keys, roles and the feedback rate limit. Pure: no Ray, no web framework.

A key reads ``tl_<id>_<secret>``. Only its id and the SHA-256 of its secret are ever stored
(keys are 128 random bits, so a fast hash is as safe as a slow one), and the secret is
compared in constant time. Keys come from three places, all merged:

- the config: ``auth.keys: [{id, role, sha256}]``;
- the environment: ``TUNELOOP_API_KEYS="admin:tl_...,feedback:tl_..."``;
- ``<storage>/auth/keys.json``, where ``tuneloop run`` keeps the admin key it creates on
  first run (printed once, never again).

Roles are ranked: ``admin`` may do everything, ``feedback`` may also predict, ``predict``
only predicts. A role listed in ``auth.open_roles`` needs no key (``predict`` by default).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cluster.config import AuthConfig
from cluster.errors import Forbidden, RateLimited, Unauthorized
from cluster.storage import Storage

ROLES = ("predict", "feedback", "admin")
KEYS_ENV = "TUNELOOP_API_KEYS"
KEYS_FILE = "auth/keys.json"
_KEY = re.compile(r"^tl_([0-9a-f]{8})_([0-9a-f]{32})$")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


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


def keys_from_env(value: str | None) -> list[ApiKey]:
    """``role:key,role:key`` -> keys; raises ValueError quoting a bad entry (never a secret)."""
    out = []
    for n, entry in enumerate(filter(None, (e.strip() for e in (value or "").split(","))), 1):
        role, _, key = entry.partition(":")
        match = _KEY.match(key)
        if role not in ROLES or not match:
            raise ValueError(f"{KEYS_ENV}: entry {n} must read <role>:tl_<8 hex>_<32 hex> with role in {ROLES}")
        out.append(ApiKey(match.group(1), role, _hash(match.group(2))))
    return out


def stored_keys_doc(keys: Iterable[ApiKey]) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return {"keys": [{"id": k.id, "role": k.role, "sha256": k.sha256, "created_at": now} for k in keys]}


def keys_from_doc(doc: dict[str, Any] | None) -> list[ApiKey]:
    return [ApiKey(k["id"], k["role"], k["sha256"]) for k in (doc or {}).get("keys", [])]


@dataclass
class Authorizer:
    keys: list[ApiKey]
    open_roles: frozenset[str] = field(default_factory=lambda: frozenset({"predict"}))

    def __post_init__(self):
        self._by_id = {k.id: k for k in self.keys}

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
        if ROLES.index(key.role) < ROLES.index(role) and role not in self.open_roles:
            raise Forbidden(f"key {key.id} has role {key.role!r}; this needs {role!r}")
        return key.id


class RateLimiter:
    """A token bucket per key: ``per_minute`` sustained, ``burst`` at once."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = per_minute / 60.0, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> None:
        now = self.clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            raise RateLimited(f"feedback rate limit for {key!r} reached; retry in {wait:.1f}s", retry_after=wait)
        self._buckets[key] = (tokens - 1.0, now)


class KeyRing:
    """Every key the config, the environment and the storage's key file hold, re-read at
    most every ``refresh_s`` so that `tuneloop keys create` takes effect without a restart."""

    def __init__(self, auth: AuthConfig, storage: Storage, refresh_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.auth, self.storage, self.refresh_s, self.clock = auth, storage, refresh_s, clock
        self._authorizer: Authorizer | None = None
        self._loaded_at = 0.0

    def keys(self) -> list[ApiKey]:
        keys = [ApiKey(k.id, k.role, k.sha256) for k in self.auth.keys]
        keys += keys_from_env(os.environ.get(KEYS_ENV))
        return keys + keys_from_doc(self.storage.read_json(KEYS_FILE))

    def check(self, authorization: str | None, role: str) -> str | None:
        if role in self.auth.open_roles and not authorization:
            return None  # nothing to read
        now = self.clock()
        if self._authorizer is None or now - self._loaded_at > self.refresh_s:
            self._authorizer, self._loaded_at = Authorizer(self.keys(), frozenset(self.auth.open_roles)), now
        return self._authorizer.check(authorization, role)


def add_stored_key(storage: Storage, role: str) -> str:
    """Create a key with ``role``, store its hash in the key file, return the key."""
    key, record = new_key(role)
    doc = storage.read_json(KEYS_FILE) or {"keys": []}
    doc["keys"] += stored_keys_doc([record])["keys"]
    storage.write_json_atomic(KEYS_FILE, doc)
    return key


def ensure_admin_key(auth: AuthConfig, storage: Storage) -> str | None:
    """On first run: create an admin key, store its hash, return the key (to print once).
    None when an admin key exists already, or the config turns this off."""
    if not auth.create_admin_key or any(k.role == "admin" for k in KeyRing(auth, storage).keys()):
        return None
    return add_stored_key(storage, "admin")

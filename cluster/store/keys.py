"""The API keys tuneloop keeps: ``<storage>/auth/keys.json`` (hashes only), read by KeyRing and
changed by ``tuneloop keys create`` / ``keys revoke`` and the first run, each change one
``Storage.update`` so that concurrent ones, from any host, lose nothing.
The rules (key format, roles, the rate limit) are ``tuneloop.core.auth``."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from tuneloop.core.auth import (
    ADMIN_KEY_FILE,
    KEYS_ENV,
    KEYS_FILE,
    ApiKey,
    Authorizer,
    ID_PATTERN,
    KeyFileError,
    RevokeError,
    keys_from_doc,
    quote_value,
    keys_from_env,
    new_key,
    stored_keys_doc,
    without_key,
)
from tuneloop.core.config import AuthConfig, ConfigError
from tuneloop.core.errors import KeyStoreUnavailable
from tuneloop.store.storage import Storage, json_bytes, private_temp_dir

log = logging.getLogger("tuneloop")
ADMIN_KEY_MADE = "admin_key_created_at"  # in the key file: the first run made its admin key then


def read_key_file(storage: Storage) -> tuple[dict[str, Any], list[ApiKey]]:
    """The key file's document (``{"keys": []}`` when there is none) and its keys. Raises
    KeyFileError when it cannot be read or has the wrong shape."""
    try:
        raw = storage.read_document(KEYS_FILE)
    except OSError as e:
        raise KeyFileError(f"cannot read the key file {storage.location(KEYS_FILE)}: {e.strerror or e}") from None
    return _parse_key_file(raw, storage.location(KEYS_FILE))


def _parse_key_file(raw: bytes | None, path: str) -> tuple[dict[str, Any], list[ApiKey]]:
    if raw is None:
        return {"keys": []}, []
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nested past the parser
        raise KeyFileError(f"the key file {path} is not valid JSON ({type(e).__name__}: {e})") from None
    return doc, keys_from_doc(doc, path)


def _change_key_file(storage: Storage, change: Callable[[dict[str, Any], list[ApiKey]], dict[str, Any] | None]) -> None:
    """One read-modify-write of the key file. A key file that cannot be read is never
    rewritten (its keys would go): KeyFileError, changing nothing."""

    def on_bytes(raw: bytes | None) -> bytes | None:
        new = change(*_parse_key_file(raw, storage.location(KEYS_FILE)))
        return None if new is None else json_bytes(new)

    storage.update(KEYS_FILE, on_bytes)


class KeyRing:
    """Every key the config, the environment and the storage's key file hold, re-read at
    most every ``refresh_s``, so that `tuneloop keys create` and `keys revoke` take effect
    without a restart.

    A key file that turns unreadable or corrupt (a bad hand edit, a changed permission, a
    failed read from an object store) must not lock every client out: the last good key
    set stays in use, the problem is logged once, and the file is tried again every
    ``refresh_s``. Only while no good set was ever loaded does a request that needs a key
    get KeyStoreUnavailable (503, retry later). A request without a key never reads the
    keys (an open role passes, any other gets 401), so it is answered as usual."""

    def __init__(self, auth: AuthConfig, storage: Storage, refresh_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, background: bool = False):
        """``background``: the sources are read once here, when a server builds its ring
        (never on a request), then by a thread of its own every ``refresh_s``; requests are
        checked against the last set, never reading. For a server's event loop, which a read
        of the key file from a slow or unreachable bucket (boto3's minutes of timeouts and
        retries) froze every 5 s, with every request it held. On a timer, not on a request:
        a revoked key is refused within ``refresh_s`` even after an idle spell. ``close``
        stops the thread."""
        self.auth, self.storage, self.refresh_s, self.clock = auth, storage, refresh_s, clock
        self.background = background
        self._keyless = Authorizer([], frozenset(auth.open_roles))  # for requests without a key
        self._authorizer: Authorizer | None = None
        self._tried_at: float | None = None
        self._problem: str | None = None  # what the last failed load said, logged once
        self._closed = threading.Event()
        if background:
            self._load()
            threading.Thread(target=self._refresh_forever, name="api-key-refresh", daemon=True).start()

    def close(self) -> None:
        self._closed.set()

    def keys(self) -> list[ApiKey]:
        """All keys; raises ConfigError (KeyFileError for the file) if a source is bad."""
        keys = [ApiKey(k.id, k.role, k.sha256) for k in self.auth.keys]
        keys += keys_from_env(os.environ.get(KEYS_ENV))
        return keys + read_key_file(self.storage)[1]

    def check(self, authorization: str | None, role: str) -> str | None:
        if not authorization:
            return self._keyless.check(authorization, role)  # None, or Unauthorized: nothing to read
        return self._current().check(authorization, role)

    def _current(self) -> Authorizer:
        now = self.clock()
        if not self.background and (self._tried_at is None or now - self._tried_at > self.refresh_s):
            self._tried_at = now
            self._load()
        if self._authorizer is None:
            raise KeyStoreUnavailable("API keys cannot be checked right now (the server cannot read its keys); "
                                      "retry later")
        return self._authorizer

    def _refresh_forever(self) -> None:
        while not self._closed.wait(self.refresh_s):
            try:
                self._load()
            except Exception:  # noqa: BLE001 - a thread that died froze the key set until a restart
                log.exception("API keys: re-reading the keys failed; trying again in %gs", self.refresh_s)

    def _load(self) -> None:
        try:
            authorizer = Authorizer(self.keys(), frozenset(self.auth.open_roles))
        except ConfigError as e:  # a bad file, or one out of reach: the last good set stays
            if str(e) != self._problem:
                self._problem = str(e)
                log.error("API keys: %s; %s", e, "still using the keys loaded before" if self._authorizer
                          else "requests that need a key get 503 until it is fixed")
        else:
            self._authorizer = authorizer  # one assignment: a request sees the old set or the new
            if self._problem is not None:
                log.info("API keys: the key sources are valid again")
            self._problem = None


def add_stored_key(storage: Storage, role: str) -> str:
    """Create a key with ``role``, store its hash in the key file, return the key."""
    key, record = new_key(role)
    _change_key_file(storage, lambda doc, _: {**doc, "keys": [*doc["keys"], *stored_keys_doc([record])["keys"]]})
    return key


def revoke_stored_key(auth: AuthConfig, storage: Storage, key_id: str) -> ApiKey:
    """Remove key ``key_id`` from the key file and return it; a running server refuses it
    from its KeyRing's next refresh (within 5 s). RevokeError, changing nothing, for an
    unknown id, and for a key of the config or TUNELOOP_API_KEYS: those are not in the file,
    and only editing them there (and restarting the server) removes them. An id in capitals
    is the same id: refused, its message said it was not 8 hex digits."""
    key_id = key_id.lower() if isinstance(key_id, str) and key_id.isascii() else key_id
    if not (isinstance(key_id, str) and ID_PATTERN.match(key_id)):
        raise RevokeError(f"a key id is 8 hex digits (tl_<id>_…), not {quote_value(key_id)}; "
                          "`tuneloop keys list` shows the ids")
    for where, keys in (("the config's auth.keys", auth.keys), (KEYS_ENV, keys_from_env(os.environ.get(KEYS_ENV)))):
        if any(k.id == key_id for k in keys):
            raise RevokeError(f"key {key_id} comes from {where}, not from the key file; "
                              "remove it there and restart the server")
    removed: dict[str, Any] = {}

    def remove(doc: dict[str, Any], _: list[ApiKey]) -> dict[str, Any]:
        rest, gone = without_key(doc, key_id)
        if gone is None:
            raise RevokeError(f"no key with id {key_id!r} in {storage.location(KEYS_FILE)} (revoked already, or "
                              "never made there); `tuneloop keys list` shows the ids")
        removed.update(gone)
        return rest

    _change_key_file(storage, remove)
    return ApiKey(removed["id"], removed["role"], removed["sha256"])


def ensure_admin_key(auth: AuthConfig, storage: Storage) -> str | None:
    """On first run: create an admin key, store its hash, return the key (for
    save_admin_key). None when an admin key exists already, one was created here before
    (the key file says so: an admin key revoked because it leaked was minted again at the
    next start), or the config turns this off."""
    if not auth.create_admin_key:
        return None
    outside = [*auth.keys, *keys_from_env(os.environ.get(KEYS_ENV))]
    if any(k.role == "admin" for k in outside):
        return None
    key, record = new_key("admin")
    made: list[str] = []

    def add_unless_there(doc: dict[str, Any], stored: list[ApiKey]) -> dict[str, Any] | None:
        made.clear()  # a retried compare-and-swap runs this again
        if any(k.role == "admin" for k in stored) or doc.get(ADMIN_KEY_MADE):
            return None  # two first runs at once make one key, not two; a revoked one stays revoked
        made.append(key)
        return {**doc, ADMIN_KEY_MADE: stored_keys_doc([record])["keys"][0]["created_at"],
                "keys": [*doc["keys"], *stored_keys_doc([record])["keys"]]}

    _change_key_file(storage, add_unless_there)
    return made[0] if made else None


def save_admin_key(storage: Storage, key: str) -> str:
    """Write the first admin key to ADMIN_KEY_FILE (0600) and return where it is, for the
    operator to read and then delete. Never printed: stdout ends up in service logs, which
    others read and keep. Never in a bucket either, whose readers (analysts querying the
    feedback, training workers) are not all admins: with an object-store root it goes to
    a private folder of this machine."""
    if storage.is_local:
        storage.write_bytes_atomic(ADMIN_KEY_FILE, f"{key}\n".encode())
        return storage.location(ADMIN_KEY_FILE)
    path = os.path.join(private_temp_dir("tuneloop-admin-key"), os.path.basename(ADMIN_KEY_FILE))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{key}\n")
    return path

"""The store's JSON documents (state.json, manifests, job records), read and changed as
pydantic models, and the one way every record writes a time.

A document cut mid-write or edited by hand raises CorruptStoredFile naming it: it was a
traceback, or a 500. No Ray, torch or web framework.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from tuneloop.core.errors import CorruptStoredFile
from tuneloop.store.storage import Storage

_Doc = TypeVar("_Doc", bound=BaseModel)


def iso_time(t: datetime) -> str:
    """How every record of the store writes a time: ISO 8601, milliseconds, UTC offset."""
    return t.isoformat(timespec="milliseconds")


def now_iso() -> str:
    return iso_time(datetime.now(UTC))


def read_stored(storage: Storage, document: type[_Doc], rel: str) -> _Doc | None:
    """The stored document ``rel`` as ``document``; None if absent. One that is cut or was
    edited by hand raises CorruptStoredFile naming it (it was a traceback, or a 500)."""
    try:
        raw = storage.read_json(rel)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptStoredFile(storage.location(rel), f"{type(e).__name__}: {e}") from None
    return None if raw is None else parse_stored(storage, document, raw, rel)


def parse_stored(storage: Storage, document: type[_Doc], raw: Any, rel: str) -> _Doc:
    """``raw`` (the JSON of ``rel``) as ``document``, or CorruptStoredFile saying what is wrong."""
    try:
        return document.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        why = f"{'.'.join(str(p) for p in first['loc']) or 'the document'}: {first['msg']}"
    raise CorruptStoredFile(storage.location(rel), why)


def update_stored(storage: Storage, document: type[_Doc], rel: str, change: Callable[[_Doc | None], _Doc]) -> _Doc:
    """``Storage.update_json`` of a stored document, read as ``document`` (None when absent)
    and changed by ``change`` (pure: compare-and-swap may run it again). One cut or edited
    by hand raises CorruptStoredFile naming it, as ``read_stored`` does for a read."""

    def apply(raw: Any | None) -> Any:
        return change(None if raw is None else parse_stored(storage, document, raw, rel)).model_dump(mode="json")

    try:
        return document.model_validate(storage.update_json(rel, apply))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # not JSON: found reading it, before ``change``
        raise CorruptStoredFile(storage.location(rel), f"{type(e).__name__}: {e}") from None

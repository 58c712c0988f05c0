"""The quarantine book: per model, the feedback keys held out of training, why, and who
released them. ``registry/<model>/quarantine.json``, each change one ``Storage.update``.

A job flags keys (``cluster/core/quarantine.py``) and records them here; their rows are
kept, beside the version, in its ``held`` table until an admin releases the key; the next
job then trains on them. A released key stays released: it is not flagged again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field, RootModel

from tuneloop.core.errors import NotQuarantined
from tuneloop.store.documents import now_iso, read_stored, update_stored
from tuneloop.store.storage import Storage


class KeyVerdict(BaseModel):
    key_id: str
    state: Literal["quarantined", "released"]
    reason: str
    since: str
    released_at: str | None = None
    stats: dict[str, Any] = Field(default_factory=dict)  # the key's numbers when it was flagged


class _Verdicts(RootModel[dict[str, KeyVerdict]]):
    """The book's file: key id -> verdict. Read as a stored document, so one cut mid-write or
    edited by hand raises CorruptStoredFile naming it: it was a traceback at `tuneloop
    feedback release`, a 500 at the quarantine endpoints, and a failure at every rollout look
    and job of the model."""


class QuarantineBook:
    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def _file(model: str) -> str:
        return f"registry/{model}/quarantine.json"

    def verdicts(self, model: str) -> dict[str, KeyVerdict]:
        book = read_stored(self.storage, _Verdicts, self._file(model))
        return book.root if book is not None else {}

    def _change(self, model: str, change: Callable[[dict[str, KeyVerdict]], None]) -> dict[str, KeyVerdict]:
        """Read the verdicts, let ``change`` edit them in place, write them back; as one
        ``Storage.update`` (``change`` may run again if another writer came first)."""

        def edit(book: _Verdicts | None) -> _Verdicts:
            verdicts = dict(book.root) if book is not None else {}
            change(verdicts)
            return _Verdicts(dict(sorted(verdicts.items())))

        return update_stored(self.storage, _Verdicts, self._file(model), edit).root

    def quarantined(self, model: str) -> set[str]:
        return {k for k, v in self.verdicts(model).items() if v.state == "quarantined"}

    def quarantine(self, model: str, flags: dict[str, str], stats: dict[str, dict[str, Any]]) -> set[str]:
        """Record newly flagged keys (a released key stays released); returns every key
        now quarantined."""

        def flag(verdicts: dict[str, KeyVerdict]) -> None:
            for key, reason in flags.items():
                if key not in verdicts:
                    verdicts[key] = KeyVerdict(key_id=key, state="quarantined", reason=reason, since=now_iso(),
                                               stats=stats.get(key, {}))

        return {k for k, v in self._change(model, flag).items() if v.state == "quarantined"}

    def release(self, model: str, key_id: str) -> KeyVerdict:
        """Let a quarantined key's rows be trained on (from the next job). Raises NotQuarantined."""

        def free(verdicts: dict[str, KeyVerdict]) -> None:
            verdict = verdicts.get(key_id)
            if verdict is None or verdict.state != "quarantined":
                raise NotQuarantined(model, key_id)
            verdicts[key_id] = verdict.model_copy(update={"state": "released", "released_at": now_iso()})

        return self._change(model, free)[key_id]

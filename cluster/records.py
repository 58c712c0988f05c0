"""The Parquet records tuneloop keeps: what it served (predictions) and what users said (feedback).

Layout, readable as it is by pyarrow, pandas, duckdb and Ray Data (hive partitioning)::

    predictions/<model>/date=YYYY-MM-DD/<ms>-<uuid>.parquet    one file per replica flush (~1 s)
    feedback/<model>/date=YYYY-MM-DD/<segment>.parquet         one file per journal segment

Feedback is written through a journal first (``cluster/journal.py``): durable when
acknowledged, in Parquet within ``feedback.compact_interval_s``.

A prediction id starts with its creation time in milliseconds (hex), so a lookup by id
reads one date partition, not the whole log.
"""

from __future__ import annotations

import logging
import secrets
import threading
import uuid
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from cluster.journal import Journal, pending_records, records_to_table
from cluster.storage import Storage

log = logging.getLogger("tuneloop")

_TS = pa.timestamp("ms", tz="UTC")

PREDICTION_SCHEMA = pa.schema(
    [
        ("prediction_id", pa.string()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("text", pa.string()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("scores", pa.map_(pa.string(), pa.float32())),
        ("created_at", _TS),
    ]
)

FEEDBACK_SCHEMA = pa.schema(
    [
        ("feedback_id", pa.string()),
        ("prediction_id", pa.string()),  # null when given as model + text
        ("model", pa.string()),
        ("version", pa.string()),  # the version that predicted; null without a prediction
        ("text", pa.string()),
        ("predicted_label", pa.string()),
        ("label", pa.string()),  # what the user says is right
        ("predicted_at", _TS),
        ("created_at", _TS),
        ("key_id", pa.string()),  # the id of the API key that sent it (never the key); null if open
    ]
)


def new_prediction_id(now: datetime | None = None) -> str:
    ms = int((now or datetime.now(UTC)).timestamp() * 1000)
    return f"{ms:012x}{secrets.token_hex(10)}"


def prediction_time(prediction_id: str) -> datetime | None:
    """The creation time encoded in an id, or None if it is not one of ours."""
    if len(prediction_id) != 32:
        return None
    try:
        ms = int(prediction_id[:12], 16)
        int(prediction_id[12:], 16)
    except ValueError:
        return None
    try:
        return datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _partition(kind: str, model: str, when: datetime) -> str:
    return f"{kind}/{model}/date={when.strftime('%Y-%m-%d')}"


def _file_name(when: datetime, ident: str) -> str:
    return f"{int(when.timestamp() * 1000):013d}-{ident}.parquet"


def _read(storage: Storage, files: list[str], schema: pa.Schema, filter=None) -> pa.Table:
    if not files:
        return schema.empty_table()
    dataset = pads.dataset(
        [storage.path(f) for f in files], schema=schema, format="parquet", filesystem=storage.fs
    )
    return dataset.to_table(filter=filter)


class PredictionLog:
    def __init__(self, storage: Storage):
        self.storage = storage

    def append(self, model: str, rows: list[dict[str, Any]]) -> None:
        """Record one served batch; rows carry the PREDICTION_SCHEMA fields."""
        if not rows:
            return
        when = rows[0]["created_at"]
        table = pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)
        rel = f"{_partition('predictions', model, when)}/{_file_name(when, uuid.uuid4().hex)}"
        self.storage.write_parquet_atomic(rel, table)

    def drop_days_before(self, model: str, day: date) -> list[str]:
        """Delete the date partitions older than ``day`` (retention); returns their names."""
        dropped = []
        for info in self.storage.list_dir(f"predictions/{model}"):
            name = info.base_name
            if name.startswith("date=") and name[5:] < day.isoformat():
                self.storage.delete_dir(f"predictions/{model}/{name}")
                dropped.append(name)
        return dropped

    def lookup(self, models: list[str], prediction_id: str) -> dict[str, Any] | None:
        when = prediction_time(prediction_id)
        if when is None:
            return None
        for model in models:
            files = self.storage.list_files(_partition("predictions", model, when), ".parquet")
            table = _read(
                self.storage, files, PREDICTION_SCHEMA, pc.field("prediction_id") == prediction_id
            )
            if table.num_rows:
                return table.slice(0, 1).to_pylist()[0]
        return None


class FeedbackStore:
    """Feedback of every model. Readers (training, statistics) need only ``storage`` and the
    journal folder; the one writer process (the ingress) calls ``open_writer`` first."""

    def __init__(self, storage: Storage, journal_dir: str):
        self.storage = storage
        self.journal_dir = journal_dir
        self._journal: Journal | None = None
        self._stop = threading.Event()

    # -- writing -------------------------------------------------------------------------
    def open_writer(self, compact_interval_s: float | None = None) -> None:
        """Become a writer: recover what dead writers left, then (if an interval is given)
        compact in the background."""
        self._journal = Journal(
            self.journal_dir, self.storage,
            to_table=lambda rows: records_to_table(rows, FEEDBACK_SCHEMA),
            partition=lambda r: f"feedback/{r['model']}/date={r['created_at'][:10]}",
        )
        self._journal.recover()
        if compact_interval_s is not None:
            threading.Thread(target=self._compact_every, args=(compact_interval_s,),
                             name="feedback-compactor", daemon=True).start()

    def append(
        self,
        *,
        model: str,
        text: str,
        label: str,
        prediction_id: str | None = None,
        version: str | None = None,
        predicted_label: str | None = None,
        predicted_at: datetime | None = None,
        key_id: str | None = None,
    ) -> str:
        """Journal one record (written and fsynced on return) and return its feedback id."""
        if self._journal is None:
            raise RuntimeError("open_writer() first")
        feedback_id = uuid.uuid4().hex
        self._journal.append({
            "feedback_id": feedback_id, "prediction_id": prediction_id, "model": model, "version": version,
            "text": text, "predicted_label": predicted_label, "label": label, "predicted_at": predicted_at,
            "created_at": datetime.now(UTC), "key_id": key_id,
        })
        return feedback_id

    def compact(self) -> int:
        return self._journal.compact() if self._journal else 0

    def _compact_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.compact()
            except Exception:  # noqa: BLE001 - the journal keeps the records; next pass retries
                log.exception("feedback: compaction failed; will retry")

    def close(self) -> None:
        self._stop.set()
        if self._journal is not None:
            self._journal.close()

    # -- reading -------------------------------------------------------------------------
    def files(self, model: str) -> list[str]:
        """The compacted Parquet files (what a training job snapshots)."""
        return self.storage.list_files(f"feedback/{model}", ".parquet")

    def read(self, model: str, files: list[str] | None = None) -> pa.Table:
        return _read(self.storage, self.files(model) if files is None else files, FEEDBACK_SCHEMA)

    def read_all(self, model: str) -> list[dict[str, Any]]:
        """Every acknowledged record, compacted or still in the journal, once each."""
        pending = [r for r in pending_records(self.journal_dir) if r.get("model") == model]
        rows = self.read(model).to_pylist() + records_to_table(pending, FEEDBACK_SCHEMA).to_pylist()
        seen: set[str] = set()
        out = []
        for row in rows:  # a segment midway through compaction is in both
            if row["feedback_id"] not in seen:
                seen.add(row["feedback_id"])
                out.append(row)
        return out

    def count_rows(self, files: list[str]) -> int:
        return sum(
            pq.ParquetFile(self.storage.path(f), filesystem=self.storage.fs).metadata.num_rows
            for f in files
        )

"""The Parquet records tuneloop keeps: what it served (predictions) and what users said (feedback).

Layout, readable as it is by pyarrow, pandas, duckdb and Ray Data (hive partitioning)::

    predictions/<model>/date=YYYY-MM-DD/<ms>-<uuid>.parquet    one file per served batch
    feedback/<model>/date=YYYY-MM-DD/<ms>-<feedback_id>.parquet one file per record

A prediction id starts with its creation time in milliseconds (hex), so a lookup by id
reads one date partition, not the whole log.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from cluster.storage import Storage

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
    def __init__(self, storage: Storage):
        self.storage = storage

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
    ) -> str:
        """Write one record durably (fsynced) and return its feedback id."""
        feedback_id = uuid.uuid4().hex
        now = datetime.now(UTC)
        row = {
            "feedback_id": feedback_id,
            "prediction_id": prediction_id,
            "model": model,
            "version": version,
            "text": text,
            "predicted_label": predicted_label,
            "label": label,
            "predicted_at": predicted_at,
            "created_at": now,
        }
        table = pa.Table.from_pylist([row], schema=FEEDBACK_SCHEMA)
        rel = f"{_partition('feedback', model, now)}/{_file_name(now, feedback_id)}"
        self.storage.write_parquet_atomic(rel, table)
        return feedback_id

    def files(self, model: str) -> list[str]:
        return self.storage.list_files(f"feedback/{model}", ".parquet")

    def read(self, model: str, files: list[str] | None = None) -> pa.Table:
        return _read(self.storage, self.files(model) if files is None else files, FEEDBACK_SCHEMA)

    def count_rows(self, files: list[str]) -> int:
        return sum(
            pq.ParquetFile(self.storage.path(f), filesystem=self.storage.fs).metadata.num_rows
            for f in files
        )

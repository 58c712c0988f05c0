"""The Parquet records tuneloop keeps: what it served (predictions) and what users said (feedback).

Layout, readable as it is by pyarrow, pandas, duckdb and Ray Data (hive partitioning)::

    predictions/<model>/date=YYYY-MM-DD/hour=HH/minute=MM/<min_ms>-<max_ms>-<hash>.parquet
                                                   one file per replica flush (~1 s) and minute
    feedback/<model>/date=YYYY-MM-DD/<segment>.parquet         one file per journal segment

Feedback is written through a journal first (``cluster/journal.py``): durable when
acknowledged, in Parquet within ``feedback.compact_interval_s`` (``feedback_store.py``).
This module holds the schemas, the reading both share, and the prediction log.

A prediction id starts with its creation time in milliseconds (hex), and a prediction file's
name states the range of its rows' ``created_at`` (UTC ms), so a lookup by id lists one minute
folder (at most ~60 files per replica) and opens only the files whose range holds that time:
its cost does not grow with the day's traffic. Hour folders alone were measured too coarse: a
replica flushing every second fills one with 3,600 files, and listing them took a lookup to
23 ms (p50). Files of the earlier layout (``date=YYYY-MM-DD/<ms>-<uuid>.parquet``) are still
found, by reading all of them in the date folder as before.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tuneloop.core.tasks import ColumnType, ListOf, MapOf, StructOf, Task
from tuneloop.store.storage import Storage

log = logging.getLogger("tuneloop")

TIMESTAMP = pa.timestamp("ms", tz="UTC")

# The columns every record has; a model's task adds its own (``Task.prediction_columns``,
# ``Task.feedback_columns``): a sentiment model's label and scores, an entity model's spans.
PREDICTION_COLUMNS = pa.schema(
    [
        ("prediction_id", pa.string()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("text", pa.string()),
        ("created_at", TIMESTAMP),
    ]
)

FEEDBACK_COLUMNS = pa.schema(
    [
        ("feedback_id", pa.string()),
        ("prediction_id", pa.string()),  # null when given as model + text
        ("model", pa.string()),
        ("version", pa.string()),  # the version that predicted; null without a prediction
        ("text", pa.string()),
        ("predicted_at", TIMESTAMP),
        ("created_at", TIMESTAMP),
        ("key_id", pa.string()),  # the id of the API key that sent it (never the key); null if open
        ("idempotency_key", pa.string()),  # the client's Idempotency-Key header, if it sent one
    ]
)


def arrow_type(t: ColumnType) -> pa.DataType:
    """A task's column type (``tuneloop.core.tasks``) as pyarrow's."""
    if isinstance(t, str):
        return pa.type_for_alias(t)
    if isinstance(t, MapOf):
        return pa.map_(arrow_type(t.key), arrow_type(t.value))
    if isinstance(t, ListOf):
        return pa.list_(arrow_type(t.item))
    if isinstance(t, StructOf):
        return pa.struct([(name, arrow_type(field)) for name, field in t.fields])
    raise TypeError(f"not a column type: {t!r}")


def _with_task_columns(shared: pa.Schema, columns: dict[str, ColumnType]) -> pa.Schema:
    return pa.schema(list(shared) + [(name, arrow_type(t)) for name, t in columns.items()])


def prediction_schema(task: Task) -> pa.Schema:
    return _with_task_columns(PREDICTION_COLUMNS, task.prediction_columns)


def feedback_schema(task: Task) -> pa.Schema:
    return _with_task_columns(FEEDBACK_COLUMNS, task.feedback_columns)


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
        # A lookup reads the minute after too: an id in the last minute before year 10000
        # would name a folder datetime cannot (a 500); no prediction of ours is that late.
        return datetime.fromtimestamp(ms / 1000, UTC) if (ms + 2 * _MINUTE_MS) / 1000 < _LATEST_S else None
    except (OverflowError, OSError, ValueError):
        return None


_MINUTE_MS = 60_000
_LATEST_S = datetime(9999, 12, 31, tzinfo=UTC).timestamp()
# A row's created_at and its id's time are the same clock reading, but the id's milliseconds
# go through a float (timestamp() * 1000) and can come out one below the stored value.
_LOOKUP_TOLERANCE_MS = 1


PREDICTIONS_ROOT = "predictions"
SHADOW_ROOT = "shadow_predictions"


def _date_folder(model: str, day: date, root: str = PREDICTIONS_ROOT) -> str:
    return f"{root}/{model}/date={day.isoformat()}"


def _minute_folder(model: str, minute: int, root: str = PREDICTIONS_ROOT) -> str:
    """The folder of ``minute``, counted in minutes since the epoch (UTC)."""
    start = datetime.fromtimestamp(minute * 60, UTC)
    return f"{_date_folder(model, start.date(), root)}/hour={start.hour:02d}/minute={start.minute:02d}"


def file_name(first_ms: int, last_ms: int, ident: str) -> str:
    # Zero-padded to 13 digits (good until the year 2286) so that names sort by time.
    return f"{first_ms:013d}-{last_ms:013d}-{ident}.parquet"


def _time_range(name: str) -> tuple[int, int] | None:
    """The created_at range (ms) a prediction file's name states; None for any other name."""
    parts = name.removesuffix(".parquet").split("-")
    if not name.endswith(".parquet") or len(parts) != 3:
        return None
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        return None


def _rows_hash(table: pa.Table) -> str:
    """A file name part derived from its rows' ids (see ``PredictionLog.append``)."""
    ids = "\n".join(str(i) for i in table.column("prediction_id").to_pylist())
    return hashlib.blake2b(ids.encode(), digest_size=16).hexdigest()


# What pyarrow raises for a file it can open but not read as the schema says: a cast that
# would lose data, a column of another type, bytes that are no Parquet. Not OSError: a
# missing file or an unreachable store fails the read, as a reader must not skip those.
_NOT_OUR_FORMAT = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)
_reported: set[str] = set()  # files already logged as unreadable by this process


def read_files(storage: Storage, files: list[str], schema: pa.Schema, filter=None,
          skipped: list[str] | None = None) -> pa.Table:
    """The rows of ``files`` in ``schema``. A file written by another tool is read as far as
    it can be: a pandas backfill's ``created_at`` in ns (pyarrow refuses the cast to ms,
    which would drop the sub-millisecond part) failed every read of the model's records, the
    ingress's start among them. Such a file is cast with truncation; one that cannot be read
    at all is logged and skipped (added to ``skipped``), not the whole read failed."""
    if not files:
        return schema.empty_table()
    try:
        return _dataset(storage, files, schema).to_table(filter=filter)
    except _NOT_OUR_FORMAT:
        return pa.concat_tables([_read_one(storage, f, schema, filter, skipped) for f in files])


def _dataset(storage: Storage, files: list[str], schema: pa.Schema) -> pads.Dataset:
    return pads.dataset([storage.path(f) for f in files], schema=schema, format="parquet", filesystem=storage.fs)


def _read_one(storage: Storage, file: str, schema: pa.Schema, filter, skipped: list[str] | None) -> pa.Table:
    try:
        return _dataset(storage, [file], schema).to_table(filter=filter)
    except _NOT_OUR_FORMAT:
        pass
    try:
        found = _dataset(storage, [file], None).to_table()
        columns = [found.column(f.name).cast(f.type, safe=False) if f.name in found.column_names
                   else pa.nulls(found.num_rows, f.type) for f in schema]
        table = pa.Table.from_arrays(columns, schema=schema)
        return table.filter(filter) if filter is not None else table
    except _NOT_OUR_FORMAT as e:
        level = logging.DEBUG if file in _reported else logging.ERROR
        _reported.add(file)
        log.log(level, "skipping %s: not readable as tuneloop's records (%s)", storage.path(file), e)
        if skipped is not None:
            skipped.append(file)
        return schema.empty_table()


def other_columns(storage: Storage, file: str, schema: pa.Schema) -> list[str]:
    """The columns ``file`` holds that ``schema`` lacks (none for a file not readable as
    Parquet: ``read_files`` deals with those)."""
    try:
        found = pq.read_schema(storage.path(file), filesystem=storage.fs)
    except _NOT_OUR_FORMAT:
        return []
    return [name for name in found.names if schema.get_field_index(name) < 0]


class PredictionLog:
    """What the replicas served, of the models in ``tasks`` (model name -> its task).
    ``root``: ``SHADOW_ROOT`` for a rollout's shadow answers, logged under the ids of the
    production answers they shadow (so the same id's lookup in the main log stays unique)."""

    def __init__(self, storage: Storage, tasks: Mapping[str, Task], root: str = PREDICTIONS_ROOT):
        self.storage = storage
        self.tasks = tasks
        self.root = root

    def append(self, model: str, rows: list[dict[str, Any]]) -> None:
        """Record served rows (the model's ``prediction_schema``, created_at set): one file per
        minute they fall in, so each row is filed under its own date, hour and minute even
        when a flush spans midnight.

        A file is named after its rows' ids rather than at random: when a flush spanning a
        minute fails after writing the first minute's file, the caller's retry rewrites that
        file in place instead of logging its rows twice."""
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=prediction_schema(self.tasks[model]))
        created_ms = table.column("created_at").cast(pa.int64()).to_pylist()
        by_minute: dict[int, list[int]] = {}
        for i, ms in enumerate(created_ms):
            by_minute.setdefault(ms // _MINUTE_MS, []).append(i)
        for minute, indices in sorted(by_minute.items()):
            part = table.take(indices)
            stamps = [created_ms[i] for i in indices]
            name = file_name(min(stamps), max(stamps), _rows_hash(part))
            self.storage.write_parquet_atomic(f"{_minute_folder(model, minute, self.root)}/{name}", part)

    def drop_days_before(self, model: str, day: date) -> list[str]:
        """Delete the date partitions older than ``day`` (retention); returns their names."""
        dropped = []
        for info in self.storage.list_dir(f"{self.root}/{model}"):
            name = info.base_name
            if name.startswith("date=") and name[5:] < day.isoformat():
                self.storage.delete_dir(f"{self.root}/{model}/{name}")
                dropped.append(name)
        return dropped

    def lookup(self, models: list[str], prediction_id: str) -> dict[str, Any] | None:
        """The logged row of a prediction id (the first of ``models`` that has it), or None.

        Lists the minute folder of the id's time and reads only the files whose named range
        holds it, so the cost stays flat however many predictions the day holds. Only when
        that finds nothing does it look for files of the earlier layout in the date folder."""
        if prediction_time(prediction_id) is None:
            return None
        ms = int(prediction_id[:12], 16)
        match = pc.field("prediction_id") == prediction_id
        for model in models:
            schema = prediction_schema(self.tasks[model])
            # Listed in turn: a tuple of both lists listed the date folder at every lookup, one
            # more round trip to a bucket on the feedback path.
            for listing in (self._files_holding, self._old_layout_files):
                table = read_files(self.storage, listing(model, ms), schema, match)
                if table.num_rows:
                    return table.slice(0, 1).to_pylist()[0]
        return None

    def _files_holding(self, model: str, ms: int) -> list[str]:
        # The neighbouring minute only when ms is within the tolerance of the boundary.
        minutes = sorted({(ms - _LOOKUP_TOLERANCE_MS) // _MINUTE_MS, (ms + _LOOKUP_TOLERANCE_MS) // _MINUTE_MS})
        files = []
        for minute in minutes:
            folder = _minute_folder(model, minute, self.root)
            for info in self.storage.list_dir(folder):
                span = _time_range(info.base_name)
                if span and span[0] - _LOOKUP_TOLERANCE_MS <= ms <= span[1] + _LOOKUP_TOLERANCE_MS:
                    files.append(f"{folder}/{info.base_name}")
        return files

    def _old_layout_files(self, model: str, ms: int) -> list[str]:
        """Files written before the hour folders, directly in the id's date folder: listing
        the date folder is cheap (24 hour folders, and these), reading them is what it was."""
        day = datetime.fromtimestamp(ms / 1000, UTC).date()
        folder = _date_folder(model, day, self.root)
        return [
            f"{folder}/{info.base_name}"
            for info in self.storage.list_dir(folder)
            if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
        ]

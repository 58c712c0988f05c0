"""Feedback, stored: a journal first (``journal.py``), durable when acknowledged, then
Parquet (``records.py`` has the layout and schema), one file per journal segment and day;
a closed day's small files merged into one. One writer process (the ingress) appends;
training and statistics read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tuneloop.core.idempotency import IdempotencyIndex, fingerprint
from tuneloop.core.tasks import Task
from tuneloop.store.journal import Journal, pending_records, records_to_table
from tuneloop.store.records import (FEEDBACK_COLUMNS, TIMESTAMP, feedback_schema, file_name, other_columns,
                                    read_files)
from tuneloop.store.storage import Storage

log = logging.getLogger("tuneloop")

MERGE_MIN_FILES = 16  # a closed day with fewer compacted files is left as it is
MERGED_PREFIX = "merged-"  # a day's merged file: merged-<first ms>-<last ms>-<digest>.parquet


JOURNAL_DIRS = "journal/dirs.json"  # every local folder a feedback writer has journalled in


def _feedback_day_folder(model: str, day: str) -> str:
    """Where a model's feedback of one day (YYYY-MM-DD) lies."""
    return f"feedback/{model}/date={day}"


# The order feedback arrived in: time, then id (ids sort in arrival order within a writer).
# Rows another tool stored without a time or an id first, as older than any of ours (the
# statistics' arrival_order too): last, they fell among a job's newest, kept-back rows.
ARRIVAL_ORDER = [("created_at", "ascending", "at_start"), ("feedback_id", "ascending", "at_start")]


def _partition_day(path: str) -> str:
    """The ``date=YYYY-MM-DD`` partition a file lies in ("" if none)."""
    return next((part[5:] for part in path.split("/") if part.startswith("date=")), "")


def _first_of_each_id(table: pa.Table, column: str) -> pa.Table:
    """``table`` without repeated ids (the first row of each stays): a merge of small files
    interrupted between writing the merged file and deleting its sources leaves rows twice."""
    ids = table.column(column)
    if table.num_rows == 0 or pc.count_distinct(ids, mode="all").as_py() == table.num_rows:
        return table
    seen: set[str] = set()
    keep = []
    for i in ids.to_pylist():
        keep.append(i is None or i not in seen)  # rows without an id (another tool's) are each their own
        seen.add(i)
    return table.filter(pa.array(keep))


def request_fields(record: dict[str, Any], task: Task) -> dict[str, Any]:
    """The fields a client sent for a feedback record (what an Idempotency-Key vouches for):
    prediction id or model and text, and the task's feedback fields."""
    said = {f: record.get(f) for f in task.feedback_fields}
    if record.get("prediction_id") is not None:
        return {"prediction_id": record["prediction_id"], **said}
    return {"model": record["model"], "text": record["text"], **said}


class FeedbackStore:
    """Feedback of the models in ``tasks`` (model name -> its task). Readers (training,
    statistics) need only ``storage`` and the journal folder; the one writer process (the
    ingress) calls ``open_writer`` first."""

    def __init__(self, storage: Storage, journal_dir: str, tasks: Mapping[str, Task]):
        self.storage = storage
        self.journal_dir = journal_dir
        self.tasks = tasks
        self._journal: Journal | None = None
        self._earlier_recovered = False  # what writers left in journal folders used before this one
        self._stop = threading.Event()
        self._idempotency = IdempotencyIndex()
        self._on_stored: Callable[[dict[str, Any]], None] | None = None
        # One append at a time: an Idempotency-Key's check, append and remember are one step.
        self._append_lock = threading.Lock()
        self._sequence = 0  # feedback ids of this writer sort in arrival order
        self._last_created_at = datetime.min.replace(tzinfo=UTC)  # created_at never goes back (append)

    # -- writing -------------------------------------------------------------------------
    def open_writer(self, compact_interval_s: float | None = None, idempotency_ttl_s: float = 86_400.0,
                    on_stored: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Become a writer: recover what dead writers left, remember the Idempotency-Keys of
        the last ``idempotency_ttl_s``, then (if an interval is given) compact in the
        background. ``on_stored`` hears each newly stored record (never a repeat)."""
        self._journal = self._journal_in(self.journal_dir)
        try:
            self._journal.recover()
        except OSError as e:  # a full disk or read-only store: the compactor tries again; feedback says 503 meanwhile
            log.warning("feedback journal: recovering dead writers' records failed (%s); left for the next "
                        "compaction", e)
        self._recover_earlier_journals()
        self._idempotency = IdempotencyIndex(idempotency_ttl_s)
        self._remember_recent_keys()
        self._resume_clock()
        self._on_stored = on_stored
        if compact_interval_s is not None:
            threading.Thread(target=self._compact_every, args=(compact_interval_s,),
                             name="feedback-compactor", daemon=True).start()

    def _journal_in(self, directory: str) -> Journal:
        return Journal(directory, self.storage, to_table=self._to_table,
                       partition=lambda r: _feedback_day_folder(r["model"], r["created_at"][:10]),
                       unmerged=self._unmerged)

    def _unmerged(self, folder: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``records`` of a closed day less those its merged file holds. A segment compacted,
        then left in the journal by a crash, then merged with its day (its own file deleted
        by the merge) was written again beside the merged file when it was recovered: every
        reader but tuneloop's own (which drop a repeated id) read its rows twice. Today's
        folder is never merged, and is not listed for this at every compaction."""
        if _partition_day(folder) >= datetime.now(UTC).date().isoformat():
            return records
        merged = [f for f in self.storage.list_files(folder, ".parquet")
                  if f.rsplit("/", 1)[-1].startswith(MERGED_PREFIX)]
        if not merged:
            return records
        ids = set(read_files(self.storage, merged, pa.schema([("feedback_id", pa.string())])).column("feedback_id").to_pylist())
        return [r for r in records if r["feedback_id"] not in ids]

    def _recover_earlier_journals(self) -> None:
        """Compact what writers left in the journal folders used before this one, which the
        storage root records (``JOURNAL_DIRS``). After a crash, records acknowledged in a
        folder that ``storage.journal_dir`` then moved away from were never read again."""
        here = os.path.abspath(self.journal_dir)
        try:
            known = self.storage.update_json(JOURNAL_DIRS, lambda dirs: None if here in (dirs or [])
                                             else sorted({*(dirs or []), here}))
            for directory in known:
                if directory != here and os.path.isdir(directory):
                    n = self._journal_in(directory).recover()
                    if n:
                        log.info("feedback journal: recovered %d records from the earlier journal folder %s", n,
                                 directory)
        except OSError as e:  # the compactor tries again, as for this folder's own
            log.warning("feedback journal: recovering earlier journal folders failed (%s); left for the next "
                        "compaction", e)
            return
        self._earlier_recovered = True

    def _to_table(self, rows: list[dict[str, Any]]) -> pa.Table:
        """One partition's journal records (one model's) as Parquet's table."""
        task = self.tasks.get(rows[0]["model"])
        if task is not None:
            return records_to_table(rows, feedback_schema(task))
        # A model taken out of the config: its records are kept, their task's columns typed
        # as pyarrow infers them.
        table = records_to_table(rows, FEEDBACK_COLUMNS)
        own = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in FEEDBACK_COLUMNS.names} for r in rows])
        for name in own.column_names:
            table = table.append_column(name, own[name])
        return table

    def _remember_recent_keys(self) -> None:
        """Rebuild the Idempotency-Key index from the records of the last TTL (the date
        partitions it spans), so a retry after a restart is still recognised."""
        now = datetime.now(UTC)
        cutoff = (now - self._idempotency.ttl).strftime("%Y-%m-%d")
        # The journal before Parquet: a segment leaves the journal only once its Parquet is
        # written, so one compacted between the two reads is still in the second.
        rows = [r for r in pending_records(self.journal_dir) if r.get("idempotency_key") and r["model"] in self.tasks]
        for model in self.tasks:
            rows += self._read_listed(model, cutoff, pc.field("idempotency_key").is_valid()).to_pylist()
        for r in rows:
            at = r["created_at"] if isinstance(r["created_at"], datetime) else datetime.fromisoformat(r["created_at"])
            request = fingerprint(request_fields(r, self.tasks[r["model"]]))
            self._idempotency.remember(r.get("key_id"), r["idempotency_key"], request, r["feedback_id"], at)
        self._idempotency.forget_before(now)

    def _resume_clock(self) -> None:
        """Start this writer's created_at past the newest stored record's (the journal's and
        each model's newest date partition's), as ``append`` keeps it past its own last one:
        a clock that ran fast set a job's watermark in the future; corrected by NTP, a
        restarted ingress stamped new records behind that watermark, where no job read them.
        One millisecond past: at the same millisecond this writer's ids sorted before it."""
        stamps = [datetime.fromisoformat(r["created_at"]) for r in pending_records(self.journal_dir)
                  if r.get("created_at")]
        times = pa.schema([("created_at", TIMESTAMP)])  # the one column: no texts read at start
        for model in self.tasks:
            newest_day = max((_partition_day(f) for f in self.files(model)), default="")
            if newest_day:  # listed again as it is read: a job merging that day deletes its sources
                newest = pc.max(self._read_listed(model, newest_day, schema=times).column("created_at")).as_py()
                stamps += [newest] if newest is not None else []
        if stamps:
            self._last_created_at = max(self._last_created_at, max(stamps) + timedelta(milliseconds=1))

    def _schema(self, model: str) -> pa.Schema:
        return feedback_schema(self.tasks[model])

    def _next_feedback_id(self, now: datetime) -> str:
        """32 hex digits that sort in arrival order within this writer: the millisecond, a
        sequence number, then randomness (writers in other processes never collide)."""
        self._sequence = (self._sequence + 1) % 16**6
        return f"{int(now.timestamp() * 1000):012x}{self._sequence:06x}{secrets.token_hex(7)}"

    def append(
        self,
        *,
        model: str,
        text: str,
        prediction_id: str | None = None,
        version: str | None = None,
        predicted_at: datetime | None = None,
        key_id: str | None = None,
        idempotency_key: str | None = None,
        **task_columns: Any,
    ) -> str:
        """Journal one record (written and fsynced on return) and return its feedback id.
        ``task_columns`` are the model's task's ``feedback_columns`` (a classifier's
        ``label`` and ``predicted_label``). With an ``idempotency_key`` seen before for the
        same request, store nothing and return the first feedback id. Raises
        StorageUnavailable when nothing could be stored."""
        if self._journal is None:
            raise RuntimeError("open_writer() first")
        task = self.tasks[model]
        unknown = sorted(set(task_columns) - set(task.feedback_columns))
        if unknown:
            raise TypeError(f"{unknown} are not columns of {task.name} feedback ({sorted(task.feedback_columns)})")
        record = {
            "feedback_id": None, "prediction_id": prediction_id, "model": model, "version": version,
            "text": text, "predicted_at": predicted_at, "created_at": None, "key_id": key_id,
            "idempotency_key": idempotency_key, **{c: task_columns.get(c) for c in task.feedback_columns},
        }
        with self._append_lock:
            # Under the lock, so that arrival order, (created_at, feedback_id) order and the
            # journal's order agree: "latest answer wins" must not depend on a random id when
            # two answers on one prediction arrive in the same millisecond.
            # Never before this writer's last record: a wall clock stepped back (NTP) put
            # acknowledged records behind a job's watermark, where no job ever read them.
            self._last_created_at = max(datetime.now(UTC), self._last_created_at)
            record["created_at"] = self._last_created_at
            record["feedback_id"] = self._next_feedback_id(record["created_at"])
            if idempotency_key is not None:
                request = fingerprint(request_fields(record, task))
                earlier = self._idempotency.answer(key_id, idempotency_key, request)
                if earlier is not None:
                    return earlier
            self._journal.append(record)
            if idempotency_key is not None:
                self._idempotency.remember(key_id, idempotency_key, request, record["feedback_id"],
                                           record["created_at"])
            if self._on_stored is not None:
                try:
                    self._on_stored(record)
                except Exception:  # noqa: BLE001 - stored already: a 500 would make a client store it again
                    log.exception("feedback %s is stored, but what follows a stored record failed",
                                  record["feedback_id"])
        return record["feedback_id"]

    def compact(self) -> int:
        if self._journal is None:
            return 0
        if not self._earlier_recovered:
            self._recover_earlier_journals()
        return self._journal.compact()

    def _compact_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                with self._append_lock:
                    self._idempotency.forget_before(datetime.now(UTC))
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
        """The records in ``files`` (all of the model's, listed now, by default)."""
        if files is not None:
            return read_files(self.storage, files, self._schema(model))
        return self._read_listed(model)

    def _read_listed(self, model: str, since_day: str = "", where=None, schema: pa.Schema | None = None) -> pa.Table:
        """Read the files listed now from ``since_day``'s partition on; if a merge replaced
        some between the listing and the read, list again. A merge deletes a day's sources
        one by one (thousands, on a bucket: minutes), so lists again may keep meeting it:
        then each file is read alone, and one gone from a day that holds a merged file is
        passed over. The merge wrote that file, with the gone file's rows, before deleting.
        ``schema``: fewer of the model's columns, read alone."""
        schema = schema or self._schema(model)
        for _ in range(3):
            files = [f for f in self.files(model) if _partition_day(f) >= since_day]
            try:
                return read_files(self.storage, files, schema, where)
            except FileNotFoundError:
                continue
        merged_days = {_partition_day(f) for f in files if f.rsplit("/", 1)[-1].startswith(MERGED_PREFIX)}
        parts = []
        for f in files:
            try:
                parts.append(read_files(self.storage, [f], schema, where))
            except FileNotFoundError:
                if _partition_day(f) not in merged_days:
                    raise
        return pa.concat_tables(parts) if parts else schema.empty_table()

    def read_since(self, model: str, after: tuple[datetime, str] | None,
                   columns: Sequence[str] | None = None) -> pa.Table:
        """The compacted records after ``after`` -- a (created_at, feedback_id) position in
        the order (created_at, feedback_id), which breaks ties within a millisecond -- or
        all of them with None, in that order. Lists and reads only the date partitions from
        ``after``'s day on, so a job's read follows the feedback that is new to it, not all
        that was ever stored. ``columns``: those alone (and the two that order them), not
        the texts, for a reader that counts or judges months of feedback."""
        schema = None
        if columns is not None:
            keep = {"created_at", "feedback_id", *columns}
            schema = pa.schema([f for f in self._schema(model) if f.name in keep])
        where = None
        day = ""
        if after is not None:
            at, last_id = after
            day = at.astimezone(UTC).date().isoformat()
            t = pa.scalar(at, TIMESTAMP)
            where = (pc.field("created_at") > t) | ((pc.field("created_at") == t) & (pc.field("feedback_id") > last_id))
        table = _first_of_each_id(self._read_listed(model, day, where, schema), "feedback_id")
        return table.sort_by(ARRIVAL_ORDER)

    def merge_closed_days(self, model: str, today: date | None = None, min_files: int = MERGE_MIN_FILES) -> int:
        """Merge each closed day's small files (compaction writes one every few seconds: up
        to 17,280 a day) into one file, so that reading a day opens one file. Returns the
        number of files removed. The merged file is written before its sources are deleted;
        a crash in between leaves rows twice, which ``read_since`` and ``read_all`` drop by
        feedback id, and the next merge cleans up. Run by a training job, under its model's
        lease, so two merges of one model never overlap."""
        today_iso = (today or datetime.now(UTC).date()).isoformat()
        by_day: dict[str, list[str]] = {}
        for f in self.files(model):
            by_day.setdefault(_partition_day(f), []).append(f)
        removed = 0
        for day, files in sorted(by_day.items()):
            if not day or day >= today_iso or len(files) < min_files:
                continue  # today's partition still grows; a merged day holds one file
            schema = self._schema(model)
            # Another tool's file with columns of its own (an annotator's name) is left as it is:
            # the merged file holds only the schema's columns, and its sources are deleted.
            files = [f for f in files if not other_columns(self.storage, f, schema)]
            unreadable: list[str] = []
            table = _first_of_each_id(read_files(self.storage, files, schema, skipped=unreadable), "feedback_id")
            if table.num_rows == 0:
                continue
            if table.column("feedback_id").null_count or table.column("created_at").null_count:
                # Another tool's rows without an id or a time: no merged file name, no order.
                log.warning("feedback %s: %s holds records without feedback_id or created_at; its files are "
                            "left unmerged", model, day)
                continue
            files = [f for f in files if f not in unreadable]  # never deleted: their rows are in no merge
            table = table.sort_by(ARRIVAL_ORDER)
            ms = table.column("created_at").cast(pa.int64()).to_pylist()
            digest = hashlib.blake2b("\n".join(table.column("feedback_id").to_pylist()).encode(),
                                     digest_size=8).hexdigest()
            merged = f"{_feedback_day_folder(model, day)}/{MERGED_PREFIX}{file_name(ms[0], ms[-1], digest)}"
            self.storage.write_parquet_atomic(merged, table)
            for f in files:
                if f != merged:
                    self.storage.delete_file(f)
                    removed += 1
            log.info("feedback %s: merged %d files of %s into one (%d records)", model, len(files), day, table.num_rows)
        return removed

    def oldest_pending(self, model: str) -> datetime | None:
        """When the oldest of ``model``'s records still in this node's journal folder arrived:
        another live writer's (a second ingress during an upgrade) that no compaction could
        reach, which may be older than the newest record in Parquet."""
        times = [r["created_at"] for r in pending_records(self.journal_dir) if r.get("model") == model]
        return min(datetime.fromisoformat(t) for t in times) if times else None

    def read_all(self, model: str, without_text: bool = False) -> list[dict[str, Any]]:
        """Every acknowledged record, compacted or still in the journal, once each;
        ``without_text``: all but the texts (the statistics' read at an ingress's start, whose
        memory the texts, up to max_chars_per_input each, made grow with all feedback ever)."""
        schema = self._schema(model)
        if without_text:
            schema = schema.remove(schema.get_field_index("text"))
        pending = [r for r in pending_records(self.journal_dir) if r.get("model") == model]
        rows = self._read_listed(model, schema=schema).to_pylist() + records_to_table(pending, schema).to_pylist()
        seen: set[str] = set()
        out = []
        for row in rows:  # a segment midway through compaction is in both
            if row["feedback_id"] is None or row["feedback_id"] not in seen:
                seen.add(row["feedback_id"])
                out.append(row)
        return out

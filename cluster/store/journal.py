"""The feedback write-ahead journal: acknowledged means fsynced; Parquet comes after.

    <journal_dir>/<segment>.wal    one record per line: "<crc32, 8 hex> <json>\\n"

``append`` writes a line and fsyncs it before returning, so a record that was acknowledged
survives ``kill -9`` of any process, and of the machine's power, from then on. ``compact``
turns finished segments into ``feedback/<model>/date=<day>/<segment>.parquet`` (one file
per model and day, each written to a temporary and renamed), then deletes the segment.

Exactly once: a segment's Parquet files are named after the segment, so compacting it
again after a crash (between the rename and the delete) finds them and writes nothing.
A line torn by a crash mid-append fails its checksum; it was never acknowledged and is
dropped. Ownership: a writer holds ``flock`` on every segment it has not yet compacted,
and the kernel releases it when the writer dies however it dies; any process that can
take the lock of a segment may recover it. Hence the journal needs a local filesystem.

Pure Python and pyarrow: no Ray, no torch.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import threading
import time
import zlib
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from tuneloop.core.errors import StorageUnavailable
from tuneloop.store.storage import Storage, fsync_dir, make_private_dirs

log = logging.getLogger("tuneloop")

SUFFIX = ".wal"
CREATING = ".new"  # a segment being created: never recovered, never compacted
# A writer creates, locks and renames a ``.new`` file within microseconds; one older than this
# was left by a writer that died in between. It is empty (records go in after the rename).
STALE_CREATING_S = 60.0


def encode_line(record: dict[str, Any]) -> bytes:
    body = json.dumps(record, separators=(",", ":"), default=_iso, ensure_ascii=False).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode_line(line: bytes) -> dict[str, Any] | None:
    """The record of one line, or None if the line is torn or corrupt."""
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        return json.loads(body)
    except ValueError:
        return None


def read_segment(path: str | Path) -> list[dict[str, Any]]:
    """Every intact record of a segment, in order; a torn tail is dropped."""
    records = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            record = decode_line(line)
            if record is None:
                if line.endswith(b"\n"):  # not a torn tail: say so, keep the rest
                    log.error("journal %s: line %d is corrupt; skipped", path, n)
                continue
            records.append(record)
    return records


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    raise TypeError(f"cannot journal a {type(value).__name__}")


class _Segment:
    """An open segment this process owns: its file descriptor holds the lock."""

    def __init__(self, path: Path):
        # Locked under a name recovery does not look at, then renamed (the lock stays with
        # the open file): created under its own name, a recovery between the create and the
        # lock held it, and the append failed with EAGAIN as a 503 (seen in CI), or worse,
        # recovered and unlinked the file the writer was about to lock.
        creating = path.with_name(path.name + CREATING)
        self.fd = os.open(creating, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(creating, path)
        except BaseException:
            os.close(self.fd)
            creating.unlink(missing_ok=True)
            raise
        self.path = path
        self.records = 0
        self.size = 0  # bytes of acknowledged records: where the next one starts

    def close(self) -> None:
        os.close(self.fd)  # releases the lock


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (near a full disk): loop until all of it is
    written, or an OSError says why not."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Journal:
    """One writer's journal. ``to_table(records)`` gives the Parquet table of some records
    and ``partition(record)`` the folder (relative to the storage root) one belongs in.

    A failed append (disk full, I/O error; a short write or a failed fsync) acknowledges
    nothing and leaves nothing behind: the segment is cut back to its last acknowledged
    record and retired (it is compacted as usual), and the next append opens a fresh
    segment, so a half-written line can never be glued to the next record. Appends then
    succeed again by themselves once space returns."""

    def __init__(self, directory: str | Path, storage: Storage, to_table, partition, unmerged=None):
        self.dir = Path(directory)
        make_private_dirs(str(self.dir))
        self.storage = storage
        self._to_table = to_table
        self._partition = partition
        # unmerged(folder, records): those a merge of the folder does not hold already (None: all)
        self._unmerged = unmerged
        self._lock = threading.Lock()
        self._active: _Segment | None = None  # opened by the first append
        self._finished: list[_Segment] = []
        self._compact_lock = threading.Lock()

    def _open_segment(self) -> _Segment:
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        segment = _Segment(self.dir / name)
        try:
            fsync_dir(str(self.dir))  # the segment's name is durable before any record in it
        except OSError:
            segment.path.unlink(missing_ok=True)
            segment.close()
            raise
        return segment

    def append(self, record: dict[str, Any]) -> None:
        """Durable on return: written and fsynced. Raises StorageUnavailable, having
        stored nothing, when the record cannot be made durable."""
        line = encode_line(record)
        with self._lock:
            try:
                if self._active is None:
                    self._active = self._open_segment()
            except OSError as e:
                raise _unavailable(e) from e
            segment = self._active
            try:
                _write_all(segment.fd, line)
                os.fsync(segment.fd)
            except OSError as e:
                self._retire_after_failure(segment)
                raise _unavailable(e) from e
            segment.size += len(line)
            segment.records += 1

    def _retire_after_failure(self, segment: _Segment) -> None:
        """Cut a segment back to its acknowledged records and stop appending to it. After a
        failed fsync the kernel may have dropped the dirty pages or kept them; either way
        the unacknowledged bytes go, and the records before them were fsynced already."""
        self._active = None
        try:
            os.ftruncate(segment.fd, segment.size)
            os.fsync(segment.fd)
        except OSError:
            log.exception("journal %s: could not cut back a failed append", segment.path.name)
        if segment.records:
            self._finished.append(segment)  # compacted with the others
        else:
            segment.path.unlink(missing_ok=True)
            segment.close()

    def compact(self) -> int:
        """Move everything journalled so far, and any dead writer's segments, into
        Parquet. Returns the number of records compacted. A segment leaves the list only
        once its Parquet is written, so a failed compaction is retried by the next one."""
        with self._compact_lock:
            # A dead writer's segments (older) first: written after this writer's newer
            # ones, a job reading Parquet between the two writes set its watermark past them,
            # and no job read them again. Then those a failed compaction left, and only then
            # the active segment: taken at every compaction whatever became of the last, each
            # interval of an object store's outage added a segment to the list, with its open
            # descriptor (200 failed intervals held 200), until the ingress ran out of them.
            done = self.recover() + self._compact_finished()
            with self._lock:
                if self._active is not None and self._active.records:
                    self._finished.append(self._active)
                    self._active = None  # the next append opens a new segment
            return done + self._compact_finished()

    def _compact_finished(self) -> int:
        with self._lock:
            finished = list(self._finished)
        done = 0
        for segment in finished:
            done += self._compact_file(segment.path)
            segment.path.unlink(missing_ok=True)
            segment.close()
            with self._lock:
                self._finished.remove(segment)
        return done

    def recover(self) -> int:
        """Compact the segments of writers that died (their locks are free), and delete the
        empty files of those that died creating a segment."""
        self._remove_stale_creating()
        done = 0
        with self._lock:
            own = {seg.path.name for seg in [self._active, *self._finished] if seg is not None}
        for path in sorted(self.dir.glob(f"*{SUFFIX}")):
            if path.name in own:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # compacted meanwhile by its writer
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer owns it
                if not path.exists():
                    continue
                n = self._compact_file(path)
                path.unlink(missing_ok=True)
                if n:
                    log.info("journal: recovered %d records from %s", n, path.name)
                done += n
            finally:
                os.close(fd)
        return done

    def _remove_stale_creating(self) -> None:
        for path in self.dir.glob(f"*{SUFFIX}{CREATING}"):
            try:
                if time.time() - path.stat().st_mtime < STALE_CREATING_S:
                    continue
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink(missing_ok=True)
            except BlockingIOError:
                continue  # a writer holds it (it renames it next)
            finally:
                os.close(fd)

    def _compact_file(self, path: Path) -> int:
        records = read_segment(path)
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in records:
            groups[self._partition(record)].append(record)
        for folder, rows in groups.items():
            rel = f"{folder}/{path.stem}.parquet"
            if self.storage.exists(rel):  # already there: compacted before a crash
                continue
            if self._unmerged is not None:  # or compacted, then merged into the day's file
                rows = self._unmerged(folder, rows)
            if rows:
                self.storage.write_parquet_atomic(rel, self._to_table(rows))
        fsync_dir(str(self.dir))
        return len(records)

    def close(self) -> None:
        try:
            self.compact()
        except Exception:  # noqa: BLE001 - what is left stays journalled; the next writer recovers it
            log.exception("journal: compaction at close failed; the next writer recovers the segments")
        with self._lock:
            for segment in [self._active, *self._finished]:
                if segment is not None:
                    segment.close()  # releases the lock; a non-empty segment stays for recovery
            if self._active is not None and not self._active.records:
                self._active.path.unlink(missing_ok=True)
            self._active, self._finished = None, []


def _unavailable(e: OSError) -> StorageUnavailable:
    """The client's 503: why in words, never the journal's path (the log has the error)."""
    log.warning("journal: an append failed: %s: %s", type(e).__name__, e)
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted"}.get(e.errno, "an I/O error")
    return StorageUnavailable(f"feedback could not be stored durably ({why}); nothing was stored, retry later")


def pending_records(directory: str | Path) -> list[dict[str, Any]]:
    """Records still in a journal folder, read by any process (they may also be in
    Parquet already if a compaction is midway: callers dedupe by record id)."""
    d = Path(directory)
    out = []
    for path in sorted(d.glob(f"*{SUFFIX}")) if d.exists() else []:
        try:
            out.extend(read_segment(path))
        except FileNotFoundError:
            continue
    return out


def records_to_table(records: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Journal records (timestamps as ISO text) as a table of ``schema``."""
    columns = {}
    for field in schema:
        values = [r.get(field.name) for r in records]
        if pa.types.is_timestamp(field.type):
            values = [None if v is None else datetime.fromisoformat(v) for v in values]
        columns[field.name] = pa.array(values, type=field.type)
    return pa.table(columns, schema=schema)


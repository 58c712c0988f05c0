"""The feedback journal on a real filesystem: durability, torn tails, exactly-once compaction."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.dataset as pads

from tuneloop.store.journal import Journal, decode_line, encode_line, pending_records, read_segment, records_to_table
from tuneloop.store.storage import Storage

SCHEMA = pa.schema([("id", pa.string()), ("model", pa.string()), ("at", pa.timestamp("ms", tz="UTC"))])


def _journal(tmp_path, name="j"):
    storage = Storage(str(tmp_path / "store"))
    return Journal(tmp_path / name, storage, lambda rows: records_to_table(rows, SCHEMA),
                   lambda r: f"feedback/{r['model']}/date={r['at'][:10]}"), storage


def _stored_ids(storage) -> list[str]:
    path = storage.path("feedback")
    if not os.path.exists(path):
        return []
    return pads.dataset(path, format="parquet", partitioning="hive").to_table().column("id").to_pylist()


def _record(i: int, model="m"):
    return {"id": f"r{i}", "model": model, "at": datetime(2026, 11, 22, 12, 0, i % 60, tzinfo=UTC)}


def test_lines_round_trip_and_torn_or_corrupt_lines_are_refused():
    line = encode_line({"text": "d\u00e9j\u00e0 vu\n", "at": datetime(2026, 1, 1, tzinfo=UTC)})
    assert decode_line(line) == {"text": "d\u00e9j\u00e0 vu\n", "at": "2026-01-01T00:00:00.000000+00:00"}
    assert decode_line(line[:-1]) is None  # torn: no newline
    assert decode_line(line[:20]) is None
    assert decode_line(line.replace(b"vu", b"VU")) is None  # checksum mismatch


def test_append_is_readable_at_once_and_compaction_moves_it_to_parquet_once(tmp_path):
    journal, storage = _journal(tmp_path)
    for i in range(5):
        journal.append(_record(i))
    assert [r["id"] for r in pending_records(tmp_path / "j")] == [f"r{i}" for i in range(5)]
    assert journal.compact() == 5
    assert sorted(_stored_ids(storage)) == [f"r{i}" for i in range(5)]
    assert pending_records(tmp_path / "j") == []
    assert journal.compact() == 0  # nothing new: nothing written twice
    journal.append(_record(5, model="other"))
    journal.close()
    assert sorted(_stored_ids(storage)) == [f"r{i}" for i in range(6)]
    assert list((tmp_path / "j").iterdir()) == []


def test_a_torn_tail_is_dropped_and_the_rest_kept(tmp_path):
    seg = tmp_path / "x.wal"
    seg.write_bytes(encode_line({"id": "a"}) + encode_line({"id": "b"})[:-7])
    assert [r["id"] for r in read_segment(seg)] == ["a"]


def test_compacting_a_segment_again_after_a_crash_writes_nothing_twice(tmp_path):
    """Crash between the Parquet rename and the segment delete: the next pass skips it."""
    journal, storage = _journal(tmp_path)
    journal.append(_record(1))
    segment = journal._active.path
    journal._compact_file(segment)  # Parquet written; the segment not yet deleted
    assert journal.compact() == 1  # compacts the segment "again": the file is already there
    assert _stored_ids(storage) == ["r1"]


def test_a_dead_writers_segments_are_recovered_and_a_live_writers_left_alone(tmp_path):
    """A writer killed with SIGKILL after its appends returned: another process recovers
    every acknowledged record; while a writer lives, its segment is never touched."""
    storage_root, jdir = tmp_path / "store", tmp_path / "j"
    script = textwrap.dedent(f"""
        import os, sys, signal
        from datetime import datetime, UTC
        sys.path.insert(0, {os.getcwd()!r})
        from tuneloop.store.journal import Journal
        from tuneloop.store.storage import Storage
        j = Journal({str(jdir)!r}, Storage({str(storage_root)!r}), None, None)
        for i in range(50):
            j.append({{"id": f"{{sys.argv[1]}}{{i}}", "model": "m", "at": datetime(2026, 11, 22, tzinfo=UTC)}})
        print("acked", flush=True)
        if sys.argv[1] == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.read()  # stay alive, holding the segment's lock
    """)
    live = subprocess.Popen([sys.executable, "-c", script, "live"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert live.stdout.readline().strip() == b"acked"
    dead = subprocess.run([sys.executable, "-c", script, "die"], capture_output=True)
    assert dead.returncode == -9 and dead.stdout.strip() == b"acked"

    journal, storage = _journal(tmp_path)
    assert journal.recover() == 50  # the dead writer's records, not the live one's
    assert sorted(_stored_ids(storage)) == sorted(f"die{i}" for i in range(50))
    live.stdin.close()
    live.wait()
    assert journal.recover() == 50  # the live writer exited without compacting: now it is ours
    assert sorted(_stored_ids(storage)) == sorted([f"die{i}" for i in range(50)] + [f"live{i}" for i in range(50)])


def test_a_recovery_running_while_a_segment_is_created_neither_takes_nor_blocks_it(tmp_path, monkeypatch):
    """Another writer's recovery (it runs after each compaction) between a new segment's
    create and its lock: it took the lock (the append failed with EAGAIN, a 503 in CI) or
    compacted the empty file and unlinked it under the writer, whose records then went into
    a deleted file."""
    import fcntl

    from tuneloop.store import journal as journal_module

    journal, storage = _journal(tmp_path)
    other, _ = _journal(tmp_path)  # the same folder, another writer
    real, state = fcntl.flock, {"armed": True}

    def flock(fd, operation):
        if state["armed"]:
            state["armed"] = False
            state["recovered"] = other.recover()
        return real(fd, operation)

    monkeypatch.setattr(journal_module.fcntl, "flock", flock)
    journal.append(_record(1))
    monkeypatch.undo()
    assert state["recovered"] == 0
    assert journal.compact() == 1 and _stored_ids(storage) == ["r1"]


def test_the_empty_file_of_a_writer_that_died_creating_a_segment_is_removed_once_stale(tmp_path):
    """A writer killed between creating a segment's ``.new`` file and renaming it leaves an
    empty file; a recovery removes it once it is a minute old, unless a writer holds it."""
    import fcntl
    import time

    journal, _ = _journal(tmp_path)
    stale, fresh, held = (tmp_path / "j" / f"{n}.wal.new" for n in ("stale", "fresh", "held"))
    for path in (stale, fresh, held):
        path.touch()
    old = time.time() - 120
    os.utime(stale, (old, old))
    os.utime(held, (old, old))
    with open(held, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)
        assert journal.recover() == 0
    assert not stale.exists() and fresh.exists() and held.exists()


def test_records_a_writer_left_in_an_earlier_journal_dir_reach_parquet_when_the_dir_changes(tmp_path):
    """A writer killed after acknowledging records; the operator then moves
    storage.journal_dir. The next writer, in the new folder, compacts the old one's."""
    root, old, new = tmp_path / "store", tmp_path / "old-journal", tmp_path / "new-journal"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.getcwd()!r})
        from tuneloop.core.tasks import make_task
        from tuneloop.store.feedback_store import FeedbackStore
        from tuneloop.store.storage import Storage
        store = FeedbackStore(Storage({str(root)!r}), {str(old)!r}, {{"m": make_task("text-classification", ["a", "b"])}})
        store.open_writer()
        for i in range(3):
            store.append(model="m", text=f"kept {{i}}", label="a")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == -9

    from tuneloop.core.tasks import make_task
    from tuneloop.store.feedback_store import FeedbackStore

    store = FeedbackStore(Storage(str(root)), str(new), {"m": make_task("text-classification", ["a", "b"])})
    store.open_writer()
    try:
        assert sorted(store.read_since("m", None).column("text").to_pylist()) == ["kept 0", "kept 1", "kept 2"]
        assert list(old.glob("*.wal")) == []
    finally:
        store.close()


def test_a_dead_writers_older_segments_reach_parquet_before_this_writers_newer_ones(tmp_path):
    """Written after this writer's own (newer) records, a dead writer's (older) ones left a
    window in which a job read the newer Parquet alone, set its watermark past the older
    records, and no job read them again."""
    class Unreachable(Storage):
        def write_parquet_atomic(self, rel, table):
            raise OSError("the bucket is unreachable")

    class Recording(Storage):
        written: list[str] = []

        def write_parquet_atomic(self, rel, table):
            self.written.append(table.column("id")[0].as_py())
            super().write_parquet_atomic(rel, table)

    root = str(tmp_path / "store")
    dead = Journal(tmp_path / "j", Unreachable(root), lambda rows: records_to_table(rows, SCHEMA),
                   lambda r: f"feedback/{r['model']}/date={r['at'][:10]}")
    dead.append(_record(1))
    dead.close()  # its compaction failed: the segment stays, unlocked, as a killed writer's would
    storage = Recording(root)
    journal = Journal(tmp_path / "j", storage, lambda rows: records_to_table(rows, SCHEMA),
                      lambda r: f"feedback/{r['model']}/date={r['at'][:10]}")
    journal.append(_record(2))
    assert journal.compact() == 2
    assert storage.written == ["r1", "r2"]
    assert sorted(_stored_ids(storage)) == ["r1", "r2"]

"""The journal on a failing disk: a write that cannot be made durable acknowledges nothing,
corrupts nothing, and appends resume by themselves once the disk is back."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid

import pytest

from tuneloop.core.errors import StorageUnavailable
from tuneloop.store.journal import Journal, pending_records, records_to_table
from tuneloop.store.storage import Storage
from tests.unit.test_journal import SCHEMA, _journal, _record, _stored_ids


def _fail_once(monkeypatch, name: str, fail):
    """Replace os.<name> as the journal sees it: ``fail(real, *args)`` runs once."""
    real = getattr(os, name)
    state = {"armed": True}

    def patched(*args):
        if state["armed"]:
            state["armed"] = False
            return fail(real, *args)
        return real(*args)

    monkeypatch.setattr(os, name, patched)


def test_a_short_write_then_enospc_acknowledges_nothing_and_corrupts_nothing(tmp_path, monkeypatch):
    journal, storage = _journal(tmp_path)
    journal.append(_record(0))

    def half_then_full(real, fd, data):
        real(fd, bytes(data[: len(data) // 2]))  # the disk took half the line...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then filled up

    _fail_once(monkeypatch, "write", half_then_full)
    with pytest.raises(StorageUnavailable, match="disk is full"):
        journal.append(_record(1))
    journal.append(_record(2))  # resumes by itself, in a fresh segment
    assert [r["id"] for r in pending_records(tmp_path / "j")] == ["r0", "r2"]
    journal.close()
    assert sorted(_stored_ids(storage)) == ["r0", "r2"]


def test_short_writes_are_completed(tmp_path, monkeypatch):
    journal, storage = _journal(tmp_path)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))  # 7 bytes a call
    for i in range(3):
        journal.append(_record(i))
    monkeypatch.undo()
    assert [r["id"] for r in pending_records(tmp_path / "j")] == ["r0", "r1", "r2"]


def test_a_failed_fsync_acknowledges_nothing_and_the_unacknowledged_bytes_go(tmp_path, monkeypatch):
    journal, storage = _journal(tmp_path)
    journal.append(_record(0))
    _fail_once(monkeypatch, "fsync", lambda real, fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(StorageUnavailable, match="I/O error"):
        journal.append(_record(1))
    journal.append(_record(2))
    assert [r["id"] for r in pending_records(tmp_path / "j")] == ["r0", "r2"]
    assert journal.compact() == 2
    assert sorted(_stored_ids(storage)) == ["r0", "r2"]


def test_a_failed_compaction_is_retried_by_the_next(tmp_path, monkeypatch):
    journal, storage = _journal(tmp_path)
    for i in range(3):
        journal.append(_record(i))
    real = Storage.write_parquet_atomic
    calls = {"n": 0}

    def flaky(self, rel, table):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, rel, table)

    monkeypatch.setattr(Storage, "write_parquet_atomic", flaky)
    with pytest.raises(OSError):
        journal.compact()
    journal.append(_record(3))
    assert journal.compact() == 4
    assert sorted(_stored_ids(storage)) == ["r0", "r1", "r2", "r3"]
    assert pending_records(tmp_path / "j") == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs where this machine lets us mount one (root, as CI runs)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the fault-injection tests above cover the same paths")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_then_freed_then_a_restart_keeps_every_acknowledged_record_once(small_disk):
    storage = Storage(str(small_disk / "store"))

    def open_journal():
        return Journal(small_disk / "j", storage, lambda rows: records_to_table(rows, SCHEMA),
                       lambda r: f"feedback/{r['model']}/date={r['at'][:10]}")

    ballast = small_disk / "ballast"
    with open(ballast, "wb") as f:  # most of the disk, so the journal fills it quickly
        f.write(os.urandom(700 * 1024))
    journal = open_journal()
    acknowledged, refused = [], 0
    for i in range(20_000):
        record = {**_record(i), "id": f"r{i}-{uuid.uuid4().hex}", "pad": "x" * 200}
        try:
            journal.append(record)
            acknowledged.append(record["id"])
        except StorageUnavailable:
            refused += 1
            if refused >= 20:
                break
    assert refused == 20 and acknowledged, "the disk never filled up"
    ballast.unlink()  # space returns
    for i in range(50):
        record = {**_record(i), "id": f"after{i}", "pad": "x" * 200}
        journal.append(record)  # no restart needed
        acknowledged.append(record["id"])
    # A crash before compaction: the segments stay; the next writer recovers them.
    for segment in [journal._active, *journal._finished]:
        if segment is not None:
            segment.close()
    restarted = open_journal()
    assert restarted.recover() == len(acknowledged)
    stored = _stored_ids(storage)
    assert sorted(stored) == sorted(acknowledged)  # each acknowledged record exactly once


def test_a_writer_starts_even_when_a_dead_writers_records_cannot_be_recovered_yet(tmp_path, monkeypatch):
    """The ingress opens the writer in its constructor: an error there restarted it forever,
    every route down, where feedback should answer 503 until the disk is back."""
    from tuneloop.core.tasks import make_task
    from tuneloop.store.feedback_store import FeedbackStore

    tasks = {"m": make_task("text-classification", ["neg", "pos"])}
    storage = Storage(str(tmp_path / "store"))
    dead = FeedbackStore(storage, str(tmp_path / "j"), tasks)
    dead.open_writer()
    acknowledged = dead.append(model="m", text="kept", label="pos")
    dead._journal._active.close()  # the process died: its segment stays, uncompacted, its lock free

    real = Storage.write_parquet_atomic
    monkeypatch.setattr(Storage, "write_parquet_atomic",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    restarted = FeedbackStore(storage, str(tmp_path / "j"), tasks)
    restarted.open_writer()  # does not raise
    monkeypatch.setattr(Storage, "write_parquet_atomic", real)
    restarted.compact()  # the disk is back: the next compaction recovers the record
    assert restarted.read("m").column("feedback_id").to_pylist() == [acknowledged]
    restarted.close()


def test_an_object_store_outage_keeps_one_open_segment_however_many_intervals_fail(tmp_path, monkeypatch):
    """Each compaction interval of an outage used to move the active segment, descriptor and
    lock held, onto a list that only a successful compaction emptied."""
    journal, storage = _journal(tmp_path)
    real = Storage.write_parquet_atomic

    def outage(self, rel, table):
        raise OSError("object store unreachable")

    monkeypatch.setattr(Storage, "write_parquet_atomic", outage)
    for i in range(20):
        journal.append(_record(i))
        with pytest.raises(OSError, match="unreachable"):
            journal.compact()
    assert len(journal._finished) == 1  # the first interval's segment; the rest are still being appended to
    assert len(list((tmp_path / "j").iterdir())) == 2
    monkeypatch.setattr(Storage, "write_parquet_atomic", real)
    assert journal.compact() == 20
    assert sorted(_stored_ids(storage)) == sorted(f"r{i}" for i in range(20))
    journal.close()
    assert list((tmp_path / "j").iterdir()) == []

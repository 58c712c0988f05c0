"""The prediction log's layout (date, hour and minute folders, files named by their time range), its
lookup by id, and the recorder's bounded buffer. Real Parquet files under tmp_path."""

import logging
import secrets
import uuid
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from tuneloop.store import records
from tuneloop.store.prediction_recorder import PredictionRecorder
from tuneloop.store.records import PredictionLog, prediction_schema, new_prediction_id
from tuneloop.store.storage import Storage
from tuneloop.core.tasks import make_task

TASK = make_task("text-classification", ["negative", "positive"])
TASKS = {"m": TASK, "other": TASK, "sentiment": TASK}


def _row(when: datetime, text: str = "t", prediction_id: str | None = None) -> dict:
    return {"prediction_id": prediction_id or new_prediction_id(when), "model": "m", "version": "v1",
            "text": text, "label": "a", "score": 1.0, "scores": {"a": 1.0}, "created_at": when}


def _id_at_ms(ms: int) -> str:
    return f"{ms:012x}{secrets.token_hex(10)}"


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))


def _reads(monkeypatch) -> list[list[str]]:
    """Every list of files the lookup hands to the Parquet reader."""
    calls: list[list[str]] = []
    real = records.read_files

    def counting(storage, files, schema, filter=None):
        calls.append(list(files))
        return real(storage, files, schema, filter)

    monkeypatch.setattr(records, "read_files", counting)
    return calls


def test_rows_are_filed_under_their_own_minute_and_found_across_the_boundary(tmp_path):
    log = PredictionLog(Storage(str(tmp_path)), TASKS)
    late = datetime(2026, 5, 6, 10, 59, 59, 999000, tzinfo=UTC)
    early = datetime(2026, 5, 6, 11, 0, 0, 0, tzinfo=UTC)
    rows = [_row(late, "late"), _row(early, "early")]
    log.append("m", rows)  # one flush spanning the hour
    files = _files(tmp_path)
    assert [f.rsplit("/", 1)[0] for f in files] == [
        "predictions/m/date=2026-05-06/hour=10/minute=59", "predictions/m/date=2026-05-06/hour=11/minute=00"]
    assert files[0].rsplit("/", 1)[1].startswith(f"{int(late.timestamp() * 1000):013d}-")
    assert log.lookup(["m"], rows[0]["prediction_id"])["text"] == "late"
    assert log.lookup(["m"], rows[1]["prediction_id"])["text"] == "early"
    # An id whose milliseconds came out one below its row's created_at (float rounding) on
    # the hour: its time says 10:59, its row is in 11:00.
    edge = _id_at_ms(int(early.timestamp() * 1000) - 1)
    log.append("m", [_row(early, "edge", prediction_id=edge)])
    assert log.lookup(["m"], edge)["text"] == "edge"


def test_a_flush_spanning_midnight_goes_to_both_days(tmp_path):
    storage = Storage(str(tmp_path))
    log = PredictionLog(storage, TASKS)
    before = datetime(2026, 12, 31, 23, 59, 59, 500000, tzinfo=UTC)
    after = before + timedelta(seconds=1)
    rows = [_row(before, "old year"), _row(after, "new year")]
    log.append("m", rows)
    assert [f.rsplit("/", 1)[0] for f in _files(tmp_path)] == [
        "predictions/m/date=2026-12-31/hour=23/minute=59", "predictions/m/date=2027-01-01/hour=00/minute=00"]
    assert log.lookup(["m"], rows[1]["prediction_id"])["text"] == "new year"
    # Hive readers see the whole log, date, hour and minute as columns.
    table = pads.dataset(str(tmp_path / "predictions/m"), partitioning="hive").to_table()
    got = zip(table["text"].to_pylist(), table["date"].to_pylist(), table["hour"].to_pylist(),
              table["minute"].to_pylist())
    assert sorted(got) == [("new year", "2027-01-01", 0, 0), ("old year", "2026-12-31", 23, 59)]
    # Retention still drops whole days.
    assert log.drop_days_before("m", date(2027, 1, 1)) == ["date=2026-12-31"]
    assert [i.base_name for i in storage.list_dir("predictions/m")] == ["date=2027-01-01"]


def test_files_of_the_earlier_layout_are_still_found(tmp_path):
    log = PredictionLog(Storage(str(tmp_path)), TASKS)
    when = datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)
    old = _row(when, "written before hour folders")
    folder = tmp_path / "predictions/m/date=2026-02-03"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([old], schema=prediction_schema(TASK)),
                   folder / f"{int(when.timestamp() * 1000):013d}-{uuid.uuid4().hex}.parquet")
    new = _row(when + timedelta(minutes=1), "written after")
    log.append("m", [new])  # the same day now holds both layouts
    assert log.lookup(["m"], old["prediction_id"])["text"] == "written before hour folders"
    assert log.lookup(["m"], new["prediction_id"])["text"] == "written after"
    table = pads.dataset(str(tmp_path / "predictions/m"), partitioning="hive").to_table()
    assert sorted(table["text"].to_pylist()) == ["written after", "written before hour folders"]


def test_lookup_opens_only_the_files_whose_range_holds_the_id(tmp_path, monkeypatch):
    log = PredictionLog(Storage(str(tmp_path)), TASKS)
    start = datetime(2026, 7, 8, 9, 0, 0, tzinfo=UTC)
    flushes = [[_row(start + timedelta(seconds=s, milliseconds=k * 100), f"{s}.{k}") for k in range(5)]
               for s in range(60)]  # one flush a second: 60 files in one minute folder
    for rows in flushes:
        log.append("m", rows)
    assert len({f.rsplit("/", 1)[0] for f in _files(tmp_path)}) == 1 and len(_files(tmp_path)) == 60
    reads = _reads(monkeypatch)
    listed, list_dir = [], log.storage.list_dir
    monkeypatch.setattr(log.storage, "list_dir", lambda folder: listed.append(folder) or list_dir(folder))
    wanted = flushes[17][3]
    assert log.lookup(["m"], wanted["prediction_id"])["text"] == wanted["text"]
    assert len(reads) == 1 and len(reads[0]) == 1 and reads[0][0].endswith(".parquet")
    assert len(listed) == 1 and "minute=" in listed[0]  # found there: the date folder is not listed
    # A time between two flushes: no file is opened (the date folder holds no old-layout files).
    reads.clear()
    assert log.lookup(["m"], new_prediction_id(start + timedelta(seconds=5, milliseconds=700))) is None
    assert reads == [[], []]


def test_lookup_tries_each_model_and_rejects_what_is_not_an_id(tmp_path):
    log = PredictionLog(Storage(str(tmp_path)), TASKS)
    row = _row(datetime.now(UTC))
    log.append("m", [row])
    assert log.lookup(["other", "m"], row["prediction_id"])["model"] == "m"
    assert log.lookup(["other"], row["prediction_id"]) is None
    assert log.lookup(["m"], "not-an-id") is None


class _FlakyLog:
    """A PredictionLog whose writes fail until ``ok`` is set; ``during`` runs inside a write."""

    def __init__(self):
        self.ok, self.written, self.during = False, [], None

    def append(self, model, rows):
        if self.during is not None:
            self.during()
        if not self.ok:
            raise OSError("store unreachable")
        self.written.extend(rows)


def test_the_buffer_is_bounded_dropping_the_oldest(caplog):
    flaky, drops = _FlakyLog(), []
    recorder = PredictionRecorder(flaky, "m", flush_interval_s=3600, max_buffered_rows=3, on_drop=drops.append)
    now = datetime.now(UTC)
    rows = [_row(now, f"t{i}") for i in range(7)]
    with caplog.at_level(logging.WARNING, logger="tuneloop"):
        recorder.record(rows[:2])
        with pytest.raises(OSError):
            recorder.flush()
        recorder.record(rows[2:5])  # writes fail, 5 > 3: t0 and t1 go
        assert recorder.dropped == 2 and drops == [2]
        with pytest.raises(OSError):
            recorder.flush()
        recorder.record(rows[5:])  # the failed rows went back first in line: t2 and t3 go
        assert recorder.dropped == 4 and drops == [2, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped the oldest 2 rows" in warnings[0]  # at most once a minute
    flaky.ok = True
    recorder.close()
    assert [r["text"] for r in flaky.written] == ["t4", "t5", "t6"]


def test_while_writes_keep_up_a_flush_intervals_rows_are_kept_past_the_bound():
    """Capped on every record, a cap below one interval's rows dropped rows of a healthy log
    (and feedback on them answered 404), with a warning that writes were failing."""
    flaky, drops = _FlakyLog(), []
    flaky.ok = True
    recorder = PredictionRecorder(flaky, "m", flush_interval_s=3600, max_buffered_rows=100, on_drop=drops.append)
    now = datetime.now(UTC)
    for b in range(5):
        recorder.record([_row(now, f"b{b}-{i}") for i in range(32)])
    assert recorder.flush() == 160 and recorder.dropped == 0 and drops == []
    recorder.close()


def test_the_requeue_after_a_failed_flush_respects_the_bound():
    flaky, drops = _FlakyLog(), []
    recorder = PredictionRecorder(flaky, "m", flush_interval_s=3600, max_buffered_rows=4, on_drop=drops.append)
    now = datetime.now(UTC)
    recorder.record([_row(now, f"a{i}") for i in range(3)])
    # Three more rows are served while the failing write is under way.
    flaky.during = lambda: recorder.record([_row(now, f"b{i}") for i in range(3)])
    with pytest.raises(OSError):
        recorder.flush()
    assert recorder.dropped == 2 and drops == [2]  # a0 and a1, the oldest
    flaky.ok, flaky.during = True, None
    recorder.close()
    assert [r["text"] for r in flaky.written] == ["a2", "b0", "b1", "b2"]


def test_retention_runs_while_every_write_fails(tmp_path):
    """On a full disk every flush fails, and retention (what frees the space) came after the
    flush in the same try: it never ran while traffic came in."""
    import errno
    import time

    log = PredictionLog(Storage(str(tmp_path)), TASKS)
    log.append("m", [_row(datetime.now(UTC) - timedelta(days=10), "old")])
    assert any("date=" in f for f in _files(tmp_path))

    def full(model, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    log.append = full
    recorder = PredictionRecorder(log, "m", flush_interval_s=0.05, retention_days=7)
    recorder.record([_row(datetime.now(UTC), "new")])  # its flush fails at every tick
    days = tmp_path / "predictions" / "m"
    deadline = time.monotonic() + 10
    while any(days.iterdir()) and time.monotonic() < deadline:  # the thread deletes under rglob's feet
        time.sleep(0.05)
    recorder._stop.set()
    recorder._thread.join()
    assert _files(tmp_path) == []  # the old day went
    assert recorder._rows and recorder._rows[0]["text"] == "new"  # kept for when space returns

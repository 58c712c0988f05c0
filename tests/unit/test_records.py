from datetime import UTC, date, datetime, timedelta

import pyarrow.dataset as pads
import pyarrow.parquet as pq

from tuneloop.store.feedback_store import FeedbackStore
from tuneloop.store.records import feedback_schema, PredictionLog, new_prediction_id, prediction_time
from tuneloop.store.storage import Storage
from tuneloop.core.tasks import make_task

TASK = make_task("text-classification", ["negative", "positive"])
TASKS = {"m": TASK, "other": TASK, "sentiment": TASK}


def test_prediction_ids_carry_their_time():
    now = datetime(2026, 3, 4, 5, 6, 7, 123000, tzinfo=UTC)
    pid = new_prediction_id(now)
    assert len(pid) == 32 and prediction_time(pid) == now
    assert new_prediction_id(now) != pid
    for bad in ["", "0000", "z" * 32, "f" * 32 + "0", "e677d21fdbff" + "0" * 20]:  # the last: 9999-12-31 23:59:59.999
        assert prediction_time(bad) is None
    assert prediction_time("e677c7d32400" + "0" * 20) == datetime(9999, 12, 30, tzinfo=UTC)


def test_a_lookup_of_an_id_from_the_last_minute_before_year_10000_finds_nothing(tmp_path):
    from tuneloop.core.tasks import make_task
    from tuneloop.store.storage import Storage

    log = PredictionLog(Storage(str(tmp_path)), {"m": make_task("text-classification", ["a", "b"])})
    assert log.lookup(["m"], "e677d21fdbff" + "0" * 20) is None


def test_feedback_is_journalled_then_parquet_in_the_fixed_schema(tmp_path):
    store = FeedbackStore(Storage(str(tmp_path / "store")), str(tmp_path / "journal"), TASKS)
    store.open_writer()
    fid = store.append(model="m", text="great", label="positive", key_id="0a1b2c3d")
    fid2 = store.append(model="m", text="bad", label="negative", prediction_id="p1", version="v1",
                        predicted_label="positive", predicted_at=datetime.now(UTC))
    assert store.files("m") == []  # acknowledged and durable, not yet compacted
    assert {r["feedback_id"] for r in store.read_all("m")} == {fid, fid2}  # but readable already
    store.compact()
    files = store.files("m")
    assert len(files) == 1 and "/date=" in files[0]
    table = store.read("m")
    assert table.schema == feedback_schema(TASK)
    rows = {r["feedback_id"]: r for r in table.to_pylist()}
    assert rows[fid]["label"] == "positive" and rows[fid]["prediction_id"] is None
    assert rows[fid]["key_id"] == "0a1b2c3d"
    assert rows[fid2]["version"] == "v1" and rows[fid2]["predicted_label"] == "positive"
    assert [r["feedback_id"] for r in store.read_all("m")].count(fid) == 1
    # Readable as it is, with hive partitioning, by plain pyarrow.
    ds = pads.dataset(str(tmp_path / "store/feedback/m"), format="parquet", partitioning="hive")
    assert ds.to_table().num_rows == 2
    assert pq.read_table(str(tmp_path / "store" / files[0])).num_rows == 2


def test_feedback_ids_sort_in_arrival_order_within_a_millisecond(tmp_path):
    """"Latest answer wins" orders by (created_at, feedback_id): answers in the same
    millisecond must still sort as they arrived (random ids once made it a coin toss)."""
    from tuneloop.core.feedback_stats import superseded

    store = FeedbackStore(Storage(str(tmp_path / "store")), str(tmp_path / "journal"), TASKS)
    store.open_writer()
    ids = [store.append(model="m", text="t", label="positive" if i % 2 else "negative", prediction_id="p" * 32)
           for i in range(200)]
    store.close()
    rows = store.read("m").sort_by([("created_at", "ascending"), ("feedback_id", "ascending")]).to_pylist()
    assert [r["feedback_id"] for r in rows] == ids and all(len(i) == 32 for i in ids)
    assert superseded(rows) == set(ids[:-1])


def test_a_closed_days_small_files_merge_into_one_and_nothing_reads_twice(tmp_path):
    import shutil
    from datetime import timedelta

    storage = Storage(str(tmp_path / "store"))
    store = FeedbackStore(storage, str(tmp_path / "journal"), TASKS)
    store.open_writer()
    for i in range(20):  # one compaction every few seconds: one small file each
        store.append(model="m", text=f"t{i}", label="positive")
        store.compact()
    before = store.read_since("m", None)
    assert len(store.files("m")) == 20
    today = datetime.now(UTC).date()
    assert store.merge_closed_days("m", today=today) == 0  # today's partition still grows
    tomorrow = today + timedelta(days=1)
    assert store.merge_closed_days("m", today=tomorrow) == 20
    (merged,) = store.files("m")
    assert "/merged-" in merged and store.read_since("m", None).equals(before)
    assert store.merge_closed_days("m", today=tomorrow) == 0  # one file: nothing to do
    # A merge cut short after writing, before deleting: the rows lie twice, and are read once.
    shutil.copy(storage.path(merged), storage.path(merged.replace("/merged-", "/copy-")))
    assert store.read_since("m", None).equals(before) and len(store.read_all("m")) == 20
    store.close()


def test_prediction_log_lookup(tmp_path):
    log = PredictionLog(Storage(str(tmp_path)), TASKS)
    now = datetime.now(UTC)
    rows = [{"prediction_id": new_prediction_id(now), "model": "m", "version": "v3", "text": f"t{i}",
             "label": "a", "score": 0.9, "scores": {"a": 0.9, "b": 0.1}, "created_at": now} for i in range(3)]
    log.append("m", rows)
    found = log.lookup(["other", "m"], rows[1]["prediction_id"])
    assert found["text"] == "t1" and found["version"] == "v3" and found["model"] == "m"
    assert log.lookup(["m"], new_prediction_id()) is None
    assert log.lookup(["m"], "not-an-id") is None


def test_prediction_log_retention_drops_old_days(tmp_path):
    log = PredictionLog(Storage(str(tmp_path)), TASKS)
    for day in (1, 2, 3):
        when = datetime(2026, 11, day, tzinfo=UTC)
        log.append("m", [{"prediction_id": new_prediction_id(when), "model": "m", "version": "v1", "text": "t",
                          "label": "a", "score": 1.0, "scores": {"a": 1.0}, "created_at": when}])
    assert log.drop_days_before("m", date(2026, 11, 3)) == ["date=2026-11-01", "date=2026-11-02"]
    assert [i.base_name for i in Storage(str(tmp_path)).list_dir("predictions/m")] == ["date=2026-11-03"]


def test_prediction_recorder_samples_and_writes_off_the_caller(tmp_path):
    from tuneloop.store.prediction_recorder import PredictionRecorder

    log = PredictionLog(Storage(str(tmp_path)), TASKS)
    draws = iter([0.1, 0.9, 0.3, 0.7])
    recorder = PredictionRecorder(log, "m", sample_rate=0.5, flush_interval_s=3600, sample=lambda: next(draws))
    now = datetime.now(UTC)
    rows = [{"prediction_id": new_prediction_id(now), "model": "m", "version": "v1", "text": f"t{i}",
             "label": "a", "score": 1.0, "scores": {"a": 1.0}, "created_at": now} for i in range(4)]
    recorder.record(rows)
    assert log.lookup(["m"], rows[0]["prediction_id"]) is None  # buffered: nothing on the caller's path
    recorder.close()  # flushes
    assert log.lookup(["m"], rows[0]["prediction_id"])["text"] == "t0"
    assert log.lookup(["m"], rows[2]["prediction_id"])["text"] == "t2"
    assert log.lookup(["m"], rows[1]["prediction_id"]) is None  # sampled out


def test_read_since_reads_only_newer_records_from_their_date_partitions(tmp_path):
    from datetime import timedelta

    storage = Storage(str(tmp_path / "store"))
    store = FeedbackStore(storage, str(tmp_path / "journal"), TASKS)
    store.open_writer()
    ids = [store.append(model="m", text=f"t{i}", label="positive") for i in range(4)]
    store.compact()
    rows = store.read_since("m", None).to_pylist()
    assert sorted(r["feedback_id"] for r in rows) == sorted(ids)
    assert [(r["created_at"], r["feedback_id"]) for r in rows] == sorted((r["created_at"], r["feedback_id"]) for r in rows)
    cut = (rows[1]["created_at"], rows[1]["feedback_id"])
    assert [r["feedback_id"] for r in store.read_since("m", cut).to_pylist()] == [r["feedback_id"] for r in rows[2:]]
    # A counting reader (the retrain controller at its start) reads no texts.
    counted = store.read_since("m", cut, columns=("label",))
    assert set(counted.column_names) == {"feedback_id", "created_at", "label"}
    assert counted.column("feedback_id").to_pylist() == [r["feedback_id"] for r in rows[2:]]
    # A partition before the cut's day is not even opened: a corrupt one there is never read.
    storage.write_bytes_atomic("feedback/m/date=2000-01-01/x.parquet", b"not parquet")
    assert store.read_since("m", (cut[0] + timedelta(days=1), "")).num_rows == 0
    store.close()


def test_a_file_written_by_another_tool_is_read_as_far_as_it_can_be(tmp_path, caplog):
    """A pandas backfill writes created_at in ns, which pyarrow will not cast to ms without
    losing data: it failed every read of the model's feedback, the ingress's start among
    them. A file that is no Parquet at all is skipped and named in the log."""
    import pyarrow as pa

    storage = Storage(str(tmp_path / "store"))
    store = FeedbackStore(storage, str(tmp_path / "journal"), TASKS)
    store.open_writer()
    ours = store.append(model="m", text="great", label="positive", idempotency_key="k1")
    store.compact()
    day = tmp_path / "store/feedback/m/date=2026-01-02"
    day.mkdir(parents=True)
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    pq.write_table(pa.table({"feedback_id": ["backfilled"], "model": ["m"], "text": ["fine"], "label": ["positive"],
                             "created_at": pa.array([at], pa.timestamp("ns", tz="UTC"))}), day / "pandas.parquet")
    (day / "truncated.parquet").write_bytes(b"PAR1 not really")
    rows = {r["feedback_id"]: r for r in store.read("m").to_pylist()}
    assert set(rows) == {ours, "backfilled"}
    assert rows["backfilled"]["created_at"] == at.replace(microsecond=678000)  # cut to the schema's ms
    assert rows["backfilled"]["prediction_id"] is None  # a column the file lacks reads as null
    assert "truncated.parquet" in caplog.text
    store.close()
    again = FeedbackStore(storage, str(tmp_path / "journal"), TASKS)  # remembers the keys of the last day
    again.open_writer()
    assert again.read("m").num_rows == 2
    again.close()


def _compacted_one_by_one(tmp_path, n: int) -> tuple[Storage, FeedbackStore]:
    """A writer that compacted after each of ``n`` records: a small file each, as at 5 s,
    all of yesterday noon (a run across midnight split them over two days, and neither day
    held enough to merge)."""
    from unittest import mock

    from tuneloop.store import feedback_store

    noon = (datetime.now(UTC) - timedelta(days=1)).replace(hour=12, minute=0, second=0, microsecond=0)

    class Yesterday(datetime):
        @classmethod
        def now(cls, tz=None):
            return noon

    storage = Storage(str(tmp_path / "store"))
    store = FeedbackStore(storage, str(tmp_path / "journal"), TASKS)
    store.open_writer()
    with mock.patch.object(feedback_store, "datetime", Yesterday):
        for i in range(n):
            store.append(model="m", text=f"t{i}", label="positive")
            store.compact()
    return storage, store


def test_a_day_merge_keeps_what_it_could_not_read_and_rows_without_ids(tmp_path):
    """The merge deleted every listed file of the day, one it had skipped as unreadable too
    (its rows gone for good); rows a backfill wrote without feedback_id crashed it, and
    all but one of them were read as duplicates of each other."""
    import pyarrow as pa
    from datetime import timedelta

    storage, store = _compacted_one_by_one(tmp_path, 16)
    day = storage.path(store.files("m")[0]).rsplit("/", 1)[0]
    with open(f"{day}/other-tool.parquet", "wb") as f:
        f.write(b"PAR1 not really")
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    assert store.merge_closed_days("m", today=tomorrow) == 16
    assert sorted(f.rsplit("/", 1)[1].split("-")[0] for f in store.files("m")) == ["merged", "other"]
    assert store.read_since("m", None).num_rows == 16

    closed = tmp_path / "store/feedback/m/date=2026-01-02"
    closed.mkdir(parents=True)
    for i in range(16):  # a backfill without ids, in many files
        pq.write_table(pa.table({"model": ["m", "m"], "text": [f"a{i}", f"b{i}"], "label": ["positive"] * 2,
                                 "created_at": pa.array([datetime(2026, 1, 2, tzinfo=UTC)] * 2,
                                                        pa.timestamp("ms", tz="UTC"))}), closed / f"backfill-{i}.parquet")
    assert store.merge_closed_days("m", today=tomorrow) == 0  # left as it is, no crash
    assert len(list(closed.iterdir())) == 16
    assert store.read_since("m", None).num_rows == 16 + 32 and len(store.read_all("m")) == 16 + 32
    store.close()


def test_a_day_merge_leaves_another_tools_file_with_columns_of_its_own_in_place(tmp_path):
    """The merged file holds the schema's columns only, and its sources are deleted: a
    backfill's extra column (an annotator's name) was gone for good."""
    import pyarrow as pa
    from datetime import timedelta

    storage, store = _compacted_one_by_one(tmp_path, 16)
    day = storage.path(store.files("m")[0]).rsplit("/", 1)[0]
    at = pa.array([datetime.now(UTC)], pa.timestamp("ms", tz="UTC"))
    pq.write_table(pa.table({"feedback_id": ["annotated"], "model": ["m"], "text": ["fine"], "label": ["positive"],
                             "created_at": at, "annotator": ["ada"]}), f"{day}/annotated.parquet")
    assert store.merge_closed_days("m", today=datetime.now(UTC).date() + timedelta(days=1)) == 16
    assert sorted(f.rsplit("/", 1)[1].split("-")[0] for f in store.files("m")) == ["annotated.parquet", "merged"]
    assert pq.read_table(f"{day}/annotated.parquet").column("annotator").to_pylist() == ["ada"]
    assert store.read_since("m", None).num_rows == 17
    store.close()


def test_a_read_that_keeps_meeting_a_merge_deleting_its_sources_still_reads_every_record(tmp_path, monkeypatch):
    """A merge deletes a day's sources one by one (minutes on a bucket); a reader listed
    again three times, met a deleted file each time and failed: an ingress starting then
    crash-looped."""
    import shutil
    from datetime import timedelta

    from tuneloop.store import feedback_store

    storage, store = _compacted_one_by_one(tmp_path, 20)
    sources = store.files("m")
    saved = tmp_path / "sources"
    shutil.copytree(storage.path(sources[0]).rsplit("/", 1)[0], saved)
    store.merge_closed_days("m", today=datetime.now(UTC).date() + timedelta(days=1))
    day = storage.path(sources[0]).rsplit("/", 1)[0]
    for f in saved.iterdir():  # the moment after the merged file was written: every source still there
        shutil.copy(f, day)
    real, doomed = feedback_store.read_files, sorted(sources)

    def racing_merge(storage_, files, schema, filter=None, skipped=None):
        if doomed:  # the merge deletes one more source before each read
            storage.delete_file(doomed.pop(0))
        return real(storage_, files, schema, filter, skipped)

    monkeypatch.setattr(feedback_store, "read_files", racing_merge)
    rows = store.read_since("m", None)
    assert sorted(rows.column("text").to_pylist()) == sorted(f"t{i}" for i in range(20))
    store.close()


def test_a_segment_recovered_after_its_day_was_merged_is_not_written_twice(tmp_path):
    """Compacted, left in the journal by a crash, then merged with its closed day: recovered,
    it was written again beside the merged file, and every reader but tuneloop's own read
    its rows twice."""
    import shutil
    from datetime import timedelta

    from tuneloop.store.journal import SUFFIX, encode_line

    journal, day = tmp_path / "journal", datetime.now(UTC) - timedelta(days=2)
    journal.mkdir()
    segments = []
    for i in range(16):  # a closed day's compactions, as a writer journalled them
        record = {"feedback_id": f"{i:032x}", "prediction_id": None, "model": "m", "version": None,
                  "text": f"t{i}", "predicted_at": None, "created_at": day + timedelta(seconds=i), "key_id": None,
                  "idempotency_key": None, "label": "positive", "predicted_label": None}
        segments.append(journal / f"{i:020d}-1-{i:08x}{SUFFIX}")
        segments[-1].write_bytes(encode_line(record))
    shutil.copy(segments[3], tmp_path / "left-by-a-crash")
    storage = Storage(str(tmp_path / "store"))
    store = FeedbackStore(storage, str(journal), TASKS)
    store.open_writer()  # recovers (compacts) the 16 segments
    assert len(store.files("m")) == 16 and store.merge_closed_days("m") == 16
    store.close()
    shutil.copy(tmp_path / "left-by-a-crash", segments[3])  # the crash: its segment was still there
    again = FeedbackStore(storage, str(journal), TASKS)
    again.open_writer()  # recovers it
    again.close()
    plain = pads.dataset(str(tmp_path / "store/feedback/m"), format="parquet", partitioning="hive").to_table()
    assert plain.num_rows == 16 and not segments[3].exists()


def test_a_wall_clock_stepped_back_never_puts_a_record_behind_an_earlier_one(tmp_path, monkeypatch):
    """NTP stepping the clock back put acknowledged records before a job's watermark, where
    no job read them, and let an older answer win "latest wins"."""
    import tuneloop.store.feedback_store as feedback_store

    clock = [datetime(2026, 5, 1, 12, 0, 5, tzinfo=UTC)]

    class SteppedClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return clock[0]

    store = FeedbackStore(Storage(str(tmp_path / "store")), str(tmp_path / "journal"), TASKS)
    store.open_writer()
    monkeypatch.setattr(feedback_store, "datetime", SteppedClock)
    first = store.append(model="m", text="t", label="negative", prediction_id="p" * 32)
    clock[0] = datetime(2026, 5, 1, 12, 0, 3, tzinfo=UTC)  # two seconds back
    second = store.append(model="m", text="t", label="positive", prediction_id="p" * 32)
    monkeypatch.undo()
    store.close()
    rows = {r["feedback_id"]: r for r in store.read("m").to_pylist()}
    assert rows[second]["created_at"] >= rows[first]["created_at"] and second > first
    after_first = store.read_since("m", (rows[first]["created_at"], first)).column("feedback_id").to_pylist()
    assert after_first == [second]


def test_a_backfill_without_times_or_ids_is_counted_by_the_feedback_statistics(tmp_path):
    """Rows another tool stored without created_at or feedback_id (kept, read with nulls)
    stopped the ingress at every start: its statistics compared None with a time."""
    import pyarrow as pa

    from tuneloop.core.feedback_stats import UNDATED, FeedbackTally, superseded

    storage = Storage(str(tmp_path / "store"))
    store = FeedbackStore(storage, str(tmp_path / "journal"), TASKS)
    store.open_writer()
    store.append(model="m", text="great", label="positive", prediction_id="p1", version="v1",
                 predicted_label="positive")
    store.compact()
    day = tmp_path / "store/feedback/m/date=2026-01-02"
    day.mkdir(parents=True)
    pq.write_table(pa.table({"model": ["m", "m"], "text": ["fine", "bad"], "label": ["negative", "negative"],
                             "prediction_id": ["p1", None]}), day / "backfill.parquet")
    rows = store.read_all("m")
    assert len(rows) == 3 and sum(r["created_at"] is None for r in rows) == 2
    lean = store.read_all("m", without_text=True)  # what the ingress's statistics read at its start
    assert [{k: v for k, v in r.items() if k != "text"} for r in rows] == lean and "text" not in lean[0]
    stats = FeedbackTally("m", TASKS["m"]).add_all(rows).stats()
    assert stats["total"] == 2 and stats["superseded"] == 1  # the undated answer on p1 is the older
    assert stats["by_label"] == {"negative": 1, "positive": 1}
    assert stats["by_day"][UNDATED] == 1
    assert superseded(rows) == set()  # the older answer has no id to name
    store.close()


def test_a_restarted_writer_stamps_records_past_the_newest_stored_one(tmp_path):
    """A clock that ran fast set a job's watermark in the future; corrected, a restarted
    writer stamped new records behind it, where no job read them."""
    import pyarrow as pa
    from datetime import timedelta

    storage = Storage(str(tmp_path / "store"))
    ahead = datetime.now(UTC) + timedelta(minutes=10)  # the fast clock's last record
    day = tmp_path / f"store/feedback/m/date={ahead.date().isoformat()}"
    day.mkdir(parents=True)
    fast_id = f"{int(ahead.timestamp() * 1000):012x}" + "f" * 20
    pq.write_table(pa.table({"feedback_id": [fast_id], "model": ["m"], "text": ["then"], "label": ["positive"],
                             "created_at": pa.array([ahead], pa.timestamp("ms", tz="UTC"))}), day / "fast.parquet")
    watermark = (ahead.replace(microsecond=ahead.microsecond // 1000 * 1000), fast_id)  # a job trained up to it
    store = FeedbackStore(storage, str(tmp_path / "journal"), TASKS)
    store.open_writer()
    new = store.append(model="m", text="now", label="negative")
    store.compact()
    assert store.read_since("m", watermark).column("feedback_id").to_pylist() == [new]
    store.close()

from datetime import UTC, datetime

import pyarrow.dataset as pads
import pyarrow.parquet as pq

from cluster.records import FEEDBACK_SCHEMA, FeedbackStore, PredictionLog, new_prediction_id, prediction_time
from cluster.storage import Storage


def test_prediction_ids_carry_their_time():
    now = datetime(2026, 3, 4, 5, 6, 7, 123000, tzinfo=UTC)
    pid = new_prediction_id(now)
    assert len(pid) == 32 and prediction_time(pid) == now
    assert new_prediction_id(now) != pid
    for bad in ["", "0000", "z" * 32, "f" * 32 + "0"]:
        assert prediction_time(bad) is None


def test_feedback_is_parquet_in_the_fixed_schema(tmp_path):
    store = FeedbackStore(Storage(str(tmp_path)))
    fid = store.append(model="m", text="great", label="positive")
    fid2 = store.append(model="m", text="bad", label="negative", prediction_id="p1", version="v1",
                        predicted_label="positive", predicted_at=datetime.now(UTC))
    files = store.files("m")
    assert len(files) == 2 and all("/date=" in f for f in files)
    table = store.read("m")
    assert table.schema == FEEDBACK_SCHEMA
    rows = {r["feedback_id"]: r for r in table.to_pylist()}
    assert rows[fid]["label"] == "positive" and rows[fid]["prediction_id"] is None
    assert rows[fid2]["version"] == "v1" and rows[fid2]["predicted_label"] == "positive"
    assert store.count_rows(files) == 2
    # Readable as it is, with hive partitioning, by plain pyarrow.
    ds = pads.dataset(str(tmp_path / "feedback/m"), format="parquet", partitioning="hive")
    assert ds.to_table().num_rows == 2
    assert pq.read_table(str(tmp_path / files[0])).num_rows == 1


def test_prediction_log_lookup(tmp_path):
    log = PredictionLog(Storage(str(tmp_path)))
    now = datetime.now(UTC)
    rows = [{"prediction_id": new_prediction_id(now), "model": "m", "version": "v3", "text": f"t{i}",
             "label": "a", "score": 0.9, "scores": {"a": 0.9, "b": 0.1}, "created_at": now} for i in range(3)]
    log.append("m", rows)
    found = log.lookup(["other", "m"], rows[1]["prediction_id"])
    assert found["text"] == "t1" and found["version"] == "v3" and found["model"] == "m"
    assert log.lookup(["m"], new_prediction_id()) is None
    assert log.lookup(["m"], "not-an-id") is None

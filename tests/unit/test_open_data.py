"""The Parquet layout reads as it is with pyarrow, pandas and duckdb (Ray Data reads it in
training): feedback and predictions, hive-partitioned by date."""

from datetime import UTC, datetime

import duckdb
import pyarrow.dataset as pads

from tuneloop.store.feedback_store import FeedbackStore
from tuneloop.store.records import PredictionLog, new_prediction_id
from tuneloop.store.storage import Storage
from tuneloop.core.tasks import make_task

TASK = make_task("text-classification", ["negative", "positive"])
TASKS = {"m": TASK, "other": TASK, "sentiment": TASK}


def _fill(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    now = datetime.now(UTC)
    rows = [{"prediction_id": new_prediction_id(now), "model": "sentiment", "version": "v1", "text": f"t{i}",
             "label": "positive", "score": 0.9, "scores": {"negative": 0.1, "positive": 0.9}, "created_at": now}
            for i in range(3)]
    PredictionLog(storage, TASKS).append("sentiment", rows)
    feedback = FeedbackStore(storage, str(tmp_path / "journal"), TASKS)
    feedback.open_writer()
    feedback.append(model="sentiment", text="t0", label="negative", prediction_id=rows[0]["prediction_id"],
                    version="v1", predicted_label="positive", predicted_at=now, key_id="0a1b2c3d")
    feedback.append(model="sentiment", text="fresh", label="positive")
    feedback.close()
    return tmp_path / "store", rows


def test_pyarrow_and_pandas_read_the_layout(tmp_path):
    root, _ = _fill(tmp_path)
    table = pads.dataset(str(root / "feedback"), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 2 and "date" in table.column_names and "key_id" in table.column_names
    frame = pads.dataset(str(root / "predictions/sentiment"), partitioning="hive").to_table().to_pandas()
    assert sorted(frame["text"]) == ["t0", "t1", "t2"]


def test_duckdb_joins_feedback_to_what_was_served(tmp_path):
    """README's query, per model: beside an NER model (entities, no label column) a glob over
    every model's files fails on the schema."""
    root, rows = _fill(tmp_path)
    ner = make_task("token-classification", ["PER", "LOC"])
    storage = Storage(str(root))
    now = datetime.now(UTC)
    PredictionLog(storage, {"ner": ner}).append("ner", [{
        "prediction_id": new_prediction_id(now), "model": "ner", "version": "v1", "text": "Ann",
        "entities": [{"start": 0, "end": 3, "label": "PER", "score": 0.9}], "created_at": now}])
    feedback = FeedbackStore(storage, str(tmp_path / "journal-ner"), {"ner": ner})
    feedback.open_writer()
    feedback.append(model="ner", text="Ann", entities=[{"start": 0, "end": 3, "label": "PER"}])
    feedback.close()
    joined = duckdb.sql(f"""
        SELECT f.label AS said, p.label AS served, p.version, p.text
        FROM read_parquet('{root}/feedback/sentiment/*/*.parquet', hive_partitioning = true) f
        JOIN read_parquet('{root}/predictions/sentiment/*/*/*/*.parquet', hive_partitioning = true) p
          USING (prediction_id)
    """).fetchall()
    assert joined == [("negative", "positive", "v1", "t0")]
    per_day = duckdb.sql(f"SELECT date, count(*) FROM read_parquet('{root}/feedback/sentiment/*/*.parquet', "
                         "hive_partitioning = true) GROUP BY date").fetchall()
    assert [n for _, n in per_day] == [2]

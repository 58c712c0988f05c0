"""Lineage (cluster/control/lineage.py and `tuneloop lineage`) over a real registry and
prediction log on disk: which version served a prediction, its ancestry, the rows each
version trained on, and which version learned from feedback on the prediction."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from tuneloop.control.cli import app
from tuneloop.control.lineage import describe, prediction_lineage, version_lineage
from tuneloop.core.errors import UnknownPrediction, UnknownVersion
from tuneloop.core.tasks import make_task
from tuneloop.store.records import PredictionLog, new_prediction_id, prediction_time
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage

LABELS = ["negative", "positive"]


def _trained_on(rows: list[tuple[str, str | None, str | None, str]]) -> pa.Table:
    source, feedback_id, prediction_id, label = zip(*rows, strict=True)
    return pa.table({"source": list(source), "feedback_id": list(feedback_id), "prediction_id": list(prediction_id),
                     "text": [f"text {i}" for i in range(len(rows))], "label": list(label)})


@pytest.fixture
def store(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    registry = Registry(Storage(str(tmp_path / "store")))
    base = {"model": "sentiment", "base_model": "tiny-bert", "task": "text-classification", "labels": LABELS,
            "version": "pending"}
    registry.publish("sentiment", str(weights), Manifest(parent=None, **base, data={"golden": {"rows": 16, "sha256": "ab"}}),
                     tables={"trained_on": _trained_on([("seed", None, None, "positive")] * 3)})
    served = new_prediction_id()
    registry.publish("sentiment", str(weights), Manifest(parent="v1", **base, data={"watermark": {
        "created_at": "2026-11-23T12:00:00.000+00:00", "feedback_id": "f2"}}),
        tables={"trained_on": _trained_on([("feedback", "f1", served, "negative"), ("feedback", "f2", None, "positive"),
                                           ("seed", None, None, "positive")])})
    registry.publish("sentiment", str(weights), Manifest(parent="v2", **base),
                     tables={"trained_on": _trained_on([("replay", "f1", served, "negative"),
                                                        ("feedback", "f3", None, "positive")])})
    log = PredictionLog(Storage(str(tmp_path / "store")), {"sentiment": make_task("text-classification", LABELS)})
    log.append("sentiment", [{"prediction_id": served, "model": "sentiment", "version": "v1", "text": "a text",
                              "label": "positive", "score": 0.9, "scores": {"negative": 0.1, "positive": 0.9},
                              "created_at": prediction_time(served)}])
    return {"registry": registry, "log": log, "served": served, "root": tmp_path / "store"}


def test_a_versions_ancestry_and_the_rows_each_trained_on(store):
    found = version_lineage(store["registry"], "sentiment", "v3")
    assert [v["version"] for v in found["ancestry"]] == ["v3", "v2", "v1"] and found["base_model"] == "tiny-bert"
    v3, v2, v1 = found["ancestry"]
    assert v3["feedback_ids"] == ["f3"] and v3["replayed_feedback_ids"] == ["f1"]
    assert v2["trained_rows"] == {"feedback": 2, "seed": 1} and v2["feedback_ids"] == ["f1", "f2"]
    assert v1["trained_rows"] == {"seed": 3} and v1["golden"]["sha256"] == "ab"
    assert v3["rows_file"].endswith("registry/sentiment/v3/data/trained_on.parquet")
    with_rows = version_lineage(store["registry"], "sentiment", "v2", with_rows=True)
    assert [r["feedback_id"] for r in with_rows["ancestry"][0]["rows"]] == ["f1", "f2", None]
    printed = [line.strip() for line in describe(with_rows) if line.startswith("      {")]
    assert [json.loads(line)["feedback_id"] for line in printed][:3] == ["f1", "f2", None]  # JSON, not a repr
    with pytest.raises(UnknownVersion):
        version_lineage(store["registry"], "sentiment", "v9")


def test_a_predictions_version_and_who_learned_from_its_feedback(store):
    found = prediction_lineage(store["registry"], store["log"], ["sentiment"], store["served"])
    assert found["prediction"]["version"] == "v1" and [v["version"] for v in found["ancestry"]] == ["v1"]
    assert found["feedback_trained_by"] == ["v2", "v3"]  # fresh in v2, replayed in v3
    with pytest.raises(UnknownPrediction):
        prediction_lineage(store["registry"], store["log"], ["sentiment"], new_prediction_id())


def test_the_cli_prints_lineage_and_refuses_unknown_ids(store, tmp_path):
    config = tmp_path / "tuneloop.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "sentiment", "base_model": "tiny-bert", "labels": LABELS}],
                                      "storage": {"root": str(store["root"])}}))
    runner = CliRunner()
    text = runner.invoke(app, ["lineage", store["served"], "-c", str(config)])
    assert text.exit_code == 0, text.output
    assert f"prediction {store['served']}: model sentiment, served by v1" in text.output
    assert "trained into: v2, v3" in text.output and "base model: tiny-bert" in text.output
    as_json = runner.invoke(app, ["lineage", "sentiment", "v2", "--json", "-c", str(config)])
    assert json.loads(as_json.output)["ancestry"][0]["feedback_ids"] == ["f1", "f2"]
    missing = runner.invoke(app, ["lineage", "sentiment", "v7", "-c", str(config)])
    assert missing.exit_code == 2 and "no version 'v7'" in missing.output
    unknown = runner.invoke(app, ["lineage", "0" * 32, "-c", str(config)])
    assert unknown.exit_code == 2 and "no prediction with id" in unknown.output

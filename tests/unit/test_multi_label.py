"""Multi-label classification: thresholds per label, feedback as the full label list, seed
rows, multi-hot targets, per-label metrics and exact-set accuracy. Pure; milliseconds."""

from __future__ import annotations

import json

import pytest

from tuneloop.core.config import ConfigError, parse_config
from tuneloop.core.errors import InvalidBody, InvalidLabel
from tuneloop.core.tasks import make_task, model_tasks

LABELS = ["billing", "refund", "urgent"]
ML = make_task("multi-label-classification", LABELS, threshold={"urgent": 0.8})


def test_each_label_is_answered_when_its_score_reaches_its_threshold():
    assert ML.activation == "sigmoid" and ML.thresholds == {"billing": 0.5, "refund": 0.5, "urgent": 0.8}
    [both, none] = ML.answers(["t", "u"], [[0.9, 0.6, 0.7], [0.1, 0.2, 0.3]], LABELS, None)
    assert both == {"labels": ["billing", "refund"], "scores": {"billing": 0.9, "refund": 0.6, "urgent": 0.7}}
    assert none["labels"] == []
    # The checkpoint's head order is what the scores follow.
    [reordered] = ML.answers(["t"], [[0.85, 0.1, 0.1]], ["urgent", "billing", "refund"], None)
    assert reordered["labels"] == ["urgent"]


def test_the_config_validates_thresholds_before_anything_starts():
    doc = {"models": [{"name": "m", "task": "multi-label-classification", "base_model": "x", "labels": LABELS,
                       "threshold": 0.3}]}
    assert model_tasks(parse_config(doc).models)["m"].thresholds["urgent"] == 0.3
    doc["models"][0]["threshold"] = {"spam": 0.5}
    with pytest.raises(ConfigError, match=r"threshold names labels \['spam'\]"):
        parse_config(doc)
    doc["models"][0]["threshold"] = 1.5
    with pytest.raises(ConfigError, match="between 0 and 1"):
        parse_config(doc)


def test_feedback_is_the_full_list_of_labels_that_apply():
    ML.check_feedback_fields({"labels": ["urgent", "billing"]})
    assert ML.feedback_target("m", {"labels": ["urgent", "billing"]}, "t") == {"labels": ["billing", "urgent"]}
    assert ML.feedback_target("m", {"labels": []}, "t") == {"labels": []}
    with pytest.raises(InvalidLabel, match="spam"):
        ML.feedback_target("m", {"labels": ["spam"]}, "t")
    with pytest.raises(InvalidBody, match="list of label names"):
        ML.check_feedback_fields({"labels": "billing"})
    row = {"labels": ["billing", "urgent"], **ML.predicted({"labels": ["urgent", "billing"]})}
    assert ML.agrees(row) and not ML.agrees({**row, "predicted_labels": ["billing"]})
    assert ML.label_outcomes({**row, "predicted_labels": ["billing", "refund"]}) == [
        ("billing", "right"), ("refund", "wrong"), ("urgent", "missed")]
    assert ML.feedback_labels({"labels": []}) == ["(none)"]


def test_seed_rows_targets_and_predictions(tmp_path):
    from tuneloop.training.data import read_dataset

    path = tmp_path / "seed.tsv"
    path.write_text("text\tlabels\nwhere is my refund\trefund|billing\nhello\t\n")
    table = read_dataset(str(path), ML)
    assert table.column("labels").to_pylist() == [["billing", "refund"], []]
    jsonl = tmp_path / "seed.jsonl"
    jsonl.write_text(json.dumps({"text": "now!", "labels": ["urgent"]}) + "\n")
    assert read_dataset(str(jsonl), ML).column("labels").to_pylist() == [["urgent"]]
    jsonl.write_text(json.dumps({"text": "x", "labels": ["spam"]}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: labels \['spam'\] outside"):
        read_dataset(str(jsonl), ML)
    targets = ML.training_targets({"labels": [["billing", "refund"], []]})
    assert ML.batch_targets(targets, {}) == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert ML.predictions([[0.9, 0.4, 0.79], [0.1, 0.6, 0.81]], {}) == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    assert ML.stratum({"labels": ["refund", "billing"]}) == "billing|refund"


def test_metrics_per_label_and_exact_sets():
    truth = [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    guess = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    m = ML.metrics(truth, guess)
    assert m.accuracy == 0.5  # texts 2 and 4 exactly right
    assert m.per_class["billing"].f1 == 1.0 and m.per_class["refund"].recall == 0.0
    assert m.per_class["urgent"].precision == 0.5 and m.per_class["urgent"].support == 1
    assert m.f1 == pytest.approx((1.0 + 0.0 + 2 / 3) / 3)


def test_the_gate_refuses_a_candidate_that_answers_no_label_where_production_answers_several():
    from tuneloop.core.config import GateConfig
    from tuneloop.core.gate import Evidence, decide

    truth = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]] * 10
    nothing = [[0.0, 0.0, 0.0]] * 40  # every sigmoid under its threshold
    lenient = GateConfig(golden_margin=1.0, class_recall_margin=1.0)
    d = decide(Evidence(metric="f1", golden=ML.metrics(truth, nothing), parent_golden=ML.metrics(truth, truth)),
               lenient)
    assert not d.accepted and "predicts no class for a golden set of 3 classes (production predicts 3)" in d.reason
    assert decide(Evidence(metric="f1", golden=ML.metrics(truth, truth), parent_golden=ML.metrics(truth, truth)),
                  lenient).accepted


def test_a_replica_scores_each_label_with_a_sigmoid(tmp_path):
    from tests.tiny_models import build_tiny_model, predict_with_replica

    weights = build_tiny_model(tmp_path / "ml", LABELS, bias=[5.0, -5.0, 5.0], task="multi-label-classification")
    [answer] = predict_with_replica({"name": "m", "task": "multi-label-classification", "labels": LABELS,
                                     "threshold": {"urgent": 0.8}}, weights, tmp_path / "store",
                                    ["my card was charged twice, help now"])
    assert answer["labels"] == ["billing", "urgent"] and answer["version"] == "v1"
    assert answer["scores"]["billing"] > 0.99 and answer["scores"]["refund"] < 0.01  # sigmoids, not a softmax


def test_the_no_label_key_of_feedback_statistics_is_no_label_name_and_nothing_to_find_is_perfect():
    with pytest.raises(ValueError, match="'\\(none\\)' is reserved"):
        make_task("multi-label-classification", ["(none)", "a"])
    none = [[0.0, 0.0, 0.0]]
    perfect = ML.metrics(none, none)
    assert (perfect.precision, perfect.recall, perfect.f1) == (1.0, 1.0, 1.0)
    assert ML.metrics(none, [[1.0, 0.0, 0.0]]).f1 == 0.0
    empty = [[0.0, 0.0, 0.0]] * 100  # a stray label once, against one on every text: told apart
    assert ML.metrics(empty, [[1.0, 0.0, 0.0]] + empty[1:]).f1 == 0.99
    assert ML.metrics(empty, [[1.0, 0.0, 0.0]] * 100).f1 == 0.0


def test_a_stray_prediction_of_a_label_the_golden_set_lacks_does_not_sink_the_average():
    """A label added to the config since the golden set was frozen: the candidate's one
    stray prediction of it averaged an F1 of 0 in, and the gate rejected a better candidate."""
    truth = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]] * 50  # no text has "urgent"
    stray = [list(t) for t in truth]
    stray[0] = [1.0, 0.0, 1.0]
    m = ML.metrics(truth, stray)
    assert m.f1 == 1.0 and m.accuracy == 0.99  # billing and refund perfect; the exact sets count the stray
    assert m.per_class["urgent"].support == 0 and m.per_class["urgent"].predicted == 1  # still reported

"""The Task contract: text classification's rules, and that a second task needs nothing
outside its own module (a span task, defined here, runs through the stores and the
feedback service unchanged). Milliseconds; no torch, no Ray."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from tuneloop.core.config import ConfigError, GateConfig, parse_config
from tuneloop.core.errors import InvalidBody, InvalidLabel, InvalidValue, PayloadTooLarge
from tuneloop.core.evaluation import EvalMetrics
from tuneloop.core.feedback_stats import feedback_stats
from tuneloop.core.gate import Evidence, decide
from tuneloop.core.tasks import TASKS, ListOf, StructOf, Task, make_task, model_tasks
from tuneloop.store.feedback_store import FeedbackStore
from tuneloop.store.records import PredictionLog, feedback_schema, new_prediction_id
from tuneloop.store.storage import Storage

LABELS = ["negative", "positive"]
TC = make_task("text-classification", LABELS)


def test_the_package_finds_its_tasks_and_the_config_names_them():
    assert TASKS["text-classification"] is type(TC)
    with pytest.raises(ConfigError, match="unknown task 'summarisation'"):
        parse_config({"models": [{"name": "m", "task": "summarisation", "base_model": "x", "labels": LABELS}]})
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_task("nope", LABELS)


def test_answers_read_scores_in_the_checkpoints_order():
    # The checkpoint's head lists positive first: its first score is positive's.
    [answer] = TC.answers(["t"], [[0.8, 0.2]], ["positive", "negative"], None)
    assert answer == {"label": "positive", "score": 0.8, "scores": {"positive": 0.8, "negative": 0.2}}
    assert TC.prediction_record({**answer, "id": "x", "version": "v1"}) == answer


def test_inputs_are_checked_as_texts():
    assert TC.check_inputs(["a", "b"], max_inputs=3, max_chars=5) == ["a", "b"]
    for bad, error in (("x", InvalidBody), ([], InvalidValue), (["a"] * 4, PayloadTooLarge),
                       (["toolong"], PayloadTooLarge), (["\ud800"], InvalidValue), ([1], InvalidBody)):
        with pytest.raises(error):
            TC.check_inputs(bad, max_inputs=3, max_chars=5)


def test_feedback_fields_are_the_label_and_it_must_be_one_of_the_models():
    TC.check_feedback_fields({"label": "positive"})
    with pytest.raises(InvalidBody, match=r"unknown field\(s\) 'entities':"):
        TC.check_feedback_fields({"label": "positive", "entities": []})
    with pytest.raises(InvalidBody, match="missing"):
        TC.check_feedback_fields({})
    assert TC.feedback_target("m", {"label": "negative"}, "t") == {"label": "negative"}
    with pytest.raises(InvalidLabel, match="neutral"):
        TC.feedback_target("m", {"label": "neutral"}, "t")
    assert TC.predicted({"label": "positive", "score": 0.9}) == {"predicted_label": "positive"}
    assert TC.agrees({"label": "positive", "predicted_label": "positive"})
    assert not TC.agrees({"label": "positive", "predicted_label": None})


@pytest.mark.parametrize("task, field, wanted", [("text-classification", "label", "a string"),
                                                 ("multi-label-classification", "labels", "a list of label names"),
                                                 ("token-classification", "entities", "a list of")])
def test_a_null_feedback_field_is_of_the_wrong_type_not_missing(task, field, wanted):
    """``"entities": null`` was answered 'missing ['entities']', though the body held it."""
    with pytest.raises(InvalidBody, match=f'"{field}" must be {wanted}.*not null'):
        make_task(task, ["PER", "LOC"] if task == "token-classification" else LABELS).check_feedback_fields({field: None})


def test_a_feedback_label_in_another_unicode_form_is_the_configured_one():
    """'tre\u0300s bien' (a combining accent) looks like 'tr\u00e8s bien' and was refused as unknown."""
    composed, decomposed = "tr\u00e8s bien", "tre\u0300s bien"
    assert composed != decomposed
    assert make_task("text-classification", ["pas bien", composed]).feedback_target("m", {"label": decomposed}, "t") \
        == {"label": composed}
    multi = make_task("multi-label-classification", ["pas bien", composed])
    assert multi.feedback_target("m", {"labels": [decomposed]}, "t") == {"labels": [composed]}
    ner = make_task("token-classification", ["PER", "CAF\u00c9"])
    assert ner.feedback_target("m", {"entities": [{"start": 0, "end": 4, "label": "CAFE\u0301"}]}, "Luna bar") == \
        {"entities": [{"start": 0, "end": 4, "label": "CAF\u00c9"}]}
    with pytest.raises(ConfigError, match=r"labels 'cafe\\u0301', 'caf\\xe9' differ only in their Unicode form"):
        parse_config({"models": [{"name": "m", "labels": ["caf\u00e9", "cafe\u0301"]}]})  # feedback could not tell
    with pytest.raises(InvalidLabel, match="bien!"):  # another text is still another label
        make_task("text-classification", ["pas bien", composed]).feedback_target("m", {"label": "bien!"}, "t")


def test_training_targets_are_label_ids_and_unknown_labels_fail_naming_them():
    assert TC.training_targets({"label": ["positive", "negative", "positive"]}) == {"label_id": [1, 0, 1]}
    with pytest.raises(ValueError, match=r"labels \['neutral'\] outside"):
        TC.training_targets({"label": ["positive", "neutral"]})
    assert TC.batch_targets({"label_id": [1, 0]}, {}) == [1, 0]
    scores = [[0.2, 0.8], [0.4, 0.6], [0.1, 0.9]]  # softmaxed, in head order: positive every time
    assert TC.metrics([1, 0, 1], TC.predictions(scores, {})).accuracy == pytest.approx(2 / 3)
    assert TC.gate_metric in EvalMetrics.model_fields


# -- a second task, written as its own module would be -----------------------------------
ENTITY = StructOf((("start", "int32"), ("end", "int32"), ("label", "string")))


class Spans(Task):
    """A toy span task: answers and feedback are lists of labelled character spans."""

    name = "test-spans"
    auto_class = "AutoModelForTokenClassification"
    gate_metric = "f1"
    prediction_columns = {"entities": ListOf(ENTITY)}
    feedback_fields = ("entities",)
    feedback_columns = {"predicted_entities": ListOf(ENTITY), "entities": ListOf(ENTITY)}
    target_columns = ("entities",)
    training_columns = {"entities": ListOf(ENTITY)}

    def head_labels(self):
        return ["O"] + [f"{p}-{label}" for label in self.labels for p in "BI"]

    def answers(self, texts, scores, head, encoding):
        return [{"entities": []} for _ in texts]

    def prediction_record(self, answer):
        return {"entities": answer["entities"]}

    def feedback_target(self, model, fields, text):
        spans = fields["entities"]
        if not isinstance(spans, list) or any(s.get("label") not in self.labels for s in spans):
            raise InvalidBody(f"entities must be spans labelled with {self.labels}")
        return {"entities": spans}

    def predicted(self, served):
        return {"predicted_entities": served["entities"]}

    def feedback_labels(self, row):
        return [s["label"] for s in row["entities"]]

    def agrees(self, row):
        return row["entities"] == row.get("predicted_entities")

    def label_outcomes(self, row):
        return []

    def training_targets(self, columns):
        return {"entities": columns["entities"]}

    def batch_targets(self, batch, encoding):
        return batch["entities"]

    def predictions(self, best, encoding):
        return best

    def metrics(self, y_true, y_pred):
        exact = sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / max(1, len(y_true))
        return EvalMetrics(accuracy=exact, precision=exact, recall=exact, f1=exact, eval_rows=len(y_true))


def test_a_second_task_runs_through_the_stores_and_the_feedback_service_unchanged(tmp_path, monkeypatch):
    from tuneloop.serving.feedback_service import FeedbackService

    monkeypatch.setitem(TASKS, Spans.name, Spans)  # what a module in tuneloop/core/tasks/ does by being there
    cfg = parse_config({"models": [{"name": "sentiment", "base_model": "x", "labels": LABELS},
                                   {"name": "ner", "task": "test-spans", "base_model": "x", "labels": ["PER", "LOC"]}],
                        "storage": {"root": str(tmp_path / "store")}})
    tasks = model_tasks(cfg.models)
    spans = tasks["ner"]
    storage = Storage(cfg.storage.root)
    now = datetime.now(UTC)
    pid = new_prediction_id(now)
    served = [{"start": 0, "end": 3, "label": "PER"}]
    log = PredictionLog(storage, tasks)
    log.append("ner", [{"prediction_id": pid, "model": "ner", "version": "v1", "text": "Ada went to Paris",
                        "created_at": now, "entities": served}])
    assert log.lookup(["sentiment", "ner"], pid)["entities"] == served

    store = FeedbackStore(storage, str(tmp_path / "journal"), tasks)
    service = FeedbackService(cfg, store, log)
    store.open_writer(on_stored=service.stored)
    right = served + [{"start": 12, "end": 17, "label": "LOC"}]
    fid = asyncio.run(service.submit({"entities": right}, prediction_id=pid, idempotency_key="k-1"))
    assert asyncio.run(service.submit({"entities": right}, prediction_id=pid, idempotency_key="k-1")) == fid
    with pytest.raises(InvalidBody, match="spans labelled"):
        asyncio.run(service.submit({"entities": [{"label": "ORG"}]}, model="ner", text="x"))
    with pytest.raises(InvalidBody, match="unknown field"):  # a classifier's field on a span model
        asyncio.run(service.submit({"label": "positive"}, prediction_id=pid))
    asyncio.run(service.submit({"label": "positive"}, model="sentiment", text="fine"))
    store.compact()
    [row] = store.read("ner").to_pylist()
    assert row["entities"] == right and row["predicted_entities"] == served
    assert store.read("ner").schema == feedback_schema(spans)
    assert store.read("sentiment").to_pylist()[0]["label"] == "positive"
    stats = feedback_stats("ner", spans, store.read_all("ner"))
    assert stats["total"] == 1 and stats["by_label"] == {"LOC": 1, "PER": 1}
    assert stats["by_version"]["v1"]["online_accuracy"] == 0.0
    assert service.stats("ner") == stats
    truth = [[("PER", 0, 3)], [], [("LOC", 1, 4)], []]
    worse = decide(Evidence(metric=spans.gate_metric, golden=spans.metrics(truth, [[], [], [], []]),
                            parent_golden=spans.metrics(truth, truth)), GateConfig())
    assert not worse.accepted and worse.checks[0].detail.startswith("f1 0.5000 on the golden set")
    store.close()


def test_a_visible_character_is_anything_but_space_control_and_format_characters():
    from tuneloop.core.tasks import has_visible_text

    for invisible in ("", " \n\t", "\x00\x01", "\u200b\ufeff", "\u2028\u00a0"):
        assert not has_visible_text(invisible), repr(invisible)
    # An emoji newer than Python 3.11's Unicode tables (unassigned there), private use, CJK, a lone "!".
    for visible in ("🩷", "\ue000", "東京", "!", "\x00a"):
        assert has_visible_text(visible), repr(visible)

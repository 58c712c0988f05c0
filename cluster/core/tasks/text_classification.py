"""Text classification: one label per text (sentiment, spam, intent)."""

from __future__ import annotations

from typing import Any

from tuneloop.core.errors import InvalidBody, InvalidLabel, json_type
from tuneloop.core.evaluation import EvalMetrics, classification_metrics
from tuneloop.core.tasks.base import MapOf, Task


class TextClassification(Task):
    name = "text-classification"
    auto_class = "AutoModelForSequenceClassification"
    gate_metric = "accuracy"
    prediction_columns = {"label": "string", "score": "float32", "scores": MapOf("string", "float32")}
    feedback_fields = ("label",)
    feedback_columns = {"predicted_label": "string", "label": "string"}
    target_columns = ("label",)
    training_columns = {"label_id": "int64"}
    # One class a text, whatever the base checkpoint says: transformers' built-in loss follows
    # the config's problem_type, and a multi-label checkpoint's (a go_emotions model) took
    # BCE over class ids, failing every job on the first batch.
    model_options = {"problem_type": "single_label_classification"}

    def __init__(self, labels):
        if len(labels) < 2:
            raise ValueError(f"text-classification needs two labels or more, got {list(labels)}")
        super().__init__(labels)

    def head_labels(self) -> list[str]:
        return self.labels

    # -- serving -----------------------------------------------------------------------
    def answers(self, texts, scores, head, encoding) -> list[dict[str, Any]]:
        out = []
        for row in scores:
            best = max(range(len(row)), key=row.__getitem__)
            out.append({"label": head[best], "score": row[best], "scores": dict(zip(head, row, strict=True))})
        return out

    def prediction_record(self, answer: dict[str, Any]) -> dict[str, Any]:
        return {"label": answer["label"], "score": answer["score"], "scores": answer["scores"]}

    # -- feedback ----------------------------------------------------------------------
    def check_feedback_fields(self, fields: dict[str, Any]) -> None:
        super().check_feedback_fields(fields)
        if not isinstance(fields["label"], str):
            raise InvalidBody(f'"label" must be a string, not {json_type(fields["label"])}')

    def feedback_target(self, model: str, fields: dict[str, Any], text: str) -> dict[str, Any]:
        label = self.spelled_as_configured(fields["label"])
        if label not in self.labels:
            raise InvalidLabel(model, label, self.labels)
        return {"label": label}

    def predicted(self, served: dict[str, Any]) -> dict[str, Any]:
        return {"predicted_label": served["label"]}

    def feedback_labels(self, row: dict[str, Any]) -> list[str]:
        return [row["label"]]

    def agrees(self, row: dict[str, Any]) -> bool:
        return row["label"] == row.get("predicted_label")

    def label_outcomes(self, row: dict[str, Any]) -> list[tuple[str, str]]:
        served = row.get("predicted_label")
        if served is None:
            return []
        return [(served, "right")] if served == row["label"] else [(served, "wrong"), (row["label"], "missed")]

    # -- training ----------------------------------------------------------------------
    def training_targets(self, columns: dict[str, list]) -> dict[str, list]:
        index = {name: i for i, name in enumerate(self.labels)}
        names = columns["label"]  # cast to the column's type (string) by the reader
        unknown = sorted({str(n) for n in names if n not in index})
        if unknown:
            raise ValueError(f"rows have labels {unknown} outside the model's labels {self.labels}")
        return {"label_id": [index[n] for n in names]}

    def batch_targets(self, batch: dict[str, list], encoding: dict[str, list]) -> list[int]:
        return [int(x) for x in batch["label_id"]]

    def predictions(self, scores: list, encoding: dict[str, list]) -> list[int]:
        return [max(range(len(row)), key=row.__getitem__) for row in scores]

    def metrics(self, y_true: list, y_pred: list) -> EvalMetrics:
        return classification_metrics(y_true, y_pred, self.labels)

"""Multi-label classification: any number of labels per text, each decided on its own
(topics, tags, intents that come together): a sigmoid per label, and a threshold per label.

The answer is the labels whose score reaches their threshold (``threshold``: one for all,
or per label, default 0.5), with every label's score. Feedback is the full list of labels
that apply (``[]``: none). Training targets are multi-hot; the loss is binary cross-entropy
per label (``problem_type: multi_label_classification``). Evaluation: per label precision,
recall and F1 with their macro averages, and ``accuracy`` the share of texts whose label set
is exactly right, which is what a user's feedback agreeing with an answer means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuneloop.core.errors import InvalidBody, InvalidLabel, json_type, quoted
from tuneloop.core.evaluation import ClassMetrics, EvalMetrics
from tuneloop.core.tasks.base import ListOf, MapOf, Task


NO_LABEL = "(none)"  # feedback statistics' key for a text given no label


class MultiLabelClassification(Task):
    name = "multi-label-classification"
    auto_class = "AutoModelForSequenceClassification"
    model_options = {"problem_type": "multi_label_classification"}
    activation = "sigmoid"
    target_dtype = "float"
    gate_metric = "f1"
    options = ("threshold",)
    reads_rows = True  # labels come as a list (jsonl, parquet) or joined by "|" (tsv, csv)
    prediction_columns = {"labels": ListOf("string"), "scores": MapOf("string", "float32")}
    feedback_fields = ("labels",)
    feedback_columns = {"predicted_labels": ListOf("string"), "labels": ListOf("string")}
    target_columns = ("labels",)
    training_columns = {"label_ids": ListOf("int64")}

    def __init__(self, labels: Sequence[str], threshold: float | dict[str, float] = 0.5):
        # A tsv or csv row joins its labels with "|" and each is stripped (dataset_row).
        unreadable = [x for x in labels if "|" in x or x != x.strip()]
        if unreadable:
            raise ValueError(f"multi-label labels {unreadable}: a label may not hold '|' or start or end with "
                             "a space (seed files join labels with '|')")
        if NO_LABEL in labels:
            raise ValueError(f"multi-label label {NO_LABEL!r} is reserved: feedback statistics count texts with "
                             "no label under it")
        super().__init__(labels)
        thresholds = threshold if isinstance(threshold, dict) else dict.fromkeys(self.labels, threshold)
        unknown = sorted(set(thresholds) - set(self.labels))
        if unknown:
            raise ValueError(f"threshold names labels {unknown} the model does not have ({self.labels})")
        bad = {k: v for k, v in thresholds.items() if not 0 < v < 1}
        if bad:
            raise ValueError(f"thresholds must be between 0 and 1 (exclusive), got {bad}")
        self.thresholds = {label: thresholds.get(label, 0.5) for label in self.labels}

    def head_labels(self) -> list[str]:
        return self.labels

    # -- serving -----------------------------------------------------------------------
    def answers(self, texts, scores, head, encoding) -> list[dict[str, Any]]:
        out = []
        for row in scores:
            by_label = dict(zip(head, row, strict=True))
            out.append({"labels": [x for x in self.labels if by_label[x] >= self.thresholds[x]],
                        "scores": by_label})
        return out

    def prediction_record(self, answer: dict[str, Any]) -> dict[str, Any]:
        return {"labels": answer["labels"], "scores": answer["scores"]}

    # -- feedback ----------------------------------------------------------------------
    def check_feedback_fields(self, fields: dict[str, Any]) -> None:
        super().check_feedback_fields(fields)
        labels = fields["labels"]
        if not isinstance(labels, list):
            raise InvalidBody(f'"labels" must be a list of label names, not {json_type(labels)}')
        if any(not isinstance(x, str) for x in labels):
            raise InvalidBody(f'"labels" must be a list of label names, got {quoted(labels)}')

    def feedback_target(self, model: str, fields: dict[str, Any], text: str) -> dict[str, Any]:
        labels = [self.spelled_as_configured(label) for label in fields["labels"]]
        for label in labels:
            if label not in self.labels:
                raise InvalidLabel(model, label, self.labels)
        return {"labels": self._ordered(labels)}

    def _ordered(self, labels) -> list[str]:
        chosen = set(labels)
        return [x for x in self.labels if x in chosen]

    def predicted(self, served: dict[str, Any]) -> dict[str, Any]:
        return {"predicted_labels": list(served["labels"])}

    def feedback_labels(self, row: dict[str, Any]) -> list[str]:
        return list(row["labels"]) or [NO_LABEL]

    def agrees(self, row: dict[str, Any]) -> bool:
        return row.get("predicted_labels") is not None and set(row["labels"]) == set(row["predicted_labels"])

    def label_outcomes(self, row: dict[str, Any]) -> list[tuple[str, str]]:
        if row.get("predicted_labels") is None:
            return []
        served, said = set(row["predicted_labels"]), set(row["labels"])
        return sorted([(x, "right") for x in served & said] + [(x, "wrong") for x in served - said]
                      + [(x, "missed") for x in said - served])

    # -- training ----------------------------------------------------------------------
    def dataset_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """``text`` and ``labels``: a list, or one string with the labels joined by ``|``
        (empty: none)."""
        labels = row.get("labels")
        if isinstance(labels, str):
            labels = [x.strip() for x in labels.split("|") if x.strip()]
        if isinstance(labels, list):  # numbers as strings, as a CSV gives them ([0, 2] for labels "0", "2")
            labels = [str(x).lower() if isinstance(x, bool) else str(x) if isinstance(x, int | float) else x
                      for x in labels]
        if not isinstance(row.get("text"), str) or not isinstance(labels, list):
            raise ValueError(f'a row needs "text" and "labels" (a list, or joined by "|"), got {row!r}')
        labels = [self.spelled_as_configured(x) for x in labels]
        unknown = sorted({str(x) for x in labels if x not in self.labels})
        if unknown:
            raise ValueError(f"labels {unknown} outside the model's labels {self.labels}")
        return {"text": row["text"], "labels": self._ordered(labels)}

    def training_targets(self, columns: dict[str, list]) -> dict[str, list]:
        index = {name: i for i, name in enumerate(self.labels)}
        unknown = sorted({str(x) for row in columns["labels"] for x in row or [] if x not in index})
        if unknown:
            raise ValueError(f"rows have labels {unknown} outside the model's labels {self.labels}")
        return {"label_ids": [[index[x] for x in row or []] for row in columns["labels"]]}

    def stratum(self, targets: dict[str, Any]) -> str:
        """Rows are sampled by their label set."""
        return "|".join(self._ordered(targets["labels"] or []))

    def batch_targets(self, batch: dict[str, list], encoding: dict[str, list]) -> list[list[float]]:
        out = []
        for ids in batch["label_ids"]:
            hot = [0.0] * len(self.labels)
            for i in ids:
                hot[int(i)] = 1.0
            out.append(hot)
        return out

    def predictions(self, scores: list, encoding: dict[str, list]) -> list[list[float]]:
        return [[1.0 if p >= self.thresholds[x] else 0.0 for x, p in zip(self.labels, row, strict=True)]
                for row in scores]

    def metrics(self, y_true: list, y_pred: list) -> EvalMetrics:
        return multi_label_metrics(y_true, y_pred, self.labels)


def multi_label_metrics(y_true: list[list[float]], y_pred: list[list[float]], labels: list[str]) -> EvalMetrics:
    """Per label precision, recall, F1 and support (texts it applies to), their macro
    averages over the labels that occur in the truth, and ``accuracy`` the share of texts
    whose whole label set is right. Over the truth's labels, not those the model predicted
    too: one stray prediction of a label the golden set lacks (one added to the config
    since) added an F1 of 0 to the candidate's average and not production's, and the gate
    rejected a better candidate. A stray label costs the precision of no label, but the
    exact-set ``accuracy`` still counts it. A truth with no label at all: all three are
    ``accuracy``, the share of texts where nothing was predicted (an F1 of 0 told a model
    that labels every text from one that labels one)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items, y_pred {len(y_pred)}")
    if not y_true:
        return EvalMetrics(accuracy=0.0, precision=0.0, recall=0.0, f1=0.0, eval_rows=0)
    per_class: dict[str, ClassMetrics] = {}
    for k, label in enumerate(labels):
        tp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t[k] and p[k])
        fp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if not t[k] and p[k])
        fn = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t[k] and not p[k])
        if tp + fp + fn == 0:
            continue
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = ClassMetrics(precision=precision, recall=recall, f1=f1, support=tp + fn, predicted=tp + fp)
    exact = sum(1 for t, p in zip(y_true, y_pred, strict=True) if list(t) == list(p)) / len(y_true)
    truth = [c for c in per_class.values() if c.support]
    if not truth:
        return EvalMetrics(accuracy=exact, precision=exact, recall=exact, f1=exact, eval_rows=len(y_true),
                           per_class=per_class)
    n = len(truth)
    return EvalMetrics(accuracy=exact, precision=sum(c.precision for c in truth) / n,
                       recall=sum(c.recall for c in truth) / n, f1=sum(c.f1 for c in truth) / n,
                       eval_rows=len(y_true), per_class=per_class)

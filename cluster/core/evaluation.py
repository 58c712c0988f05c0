"""Evaluation: the one metrics type of a version (``EvalMetrics``, stored in manifests and
job records, compared by the gate) and how classification computes it. Pure Python."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field


class ClassMetrics(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int  # rows whose true class this is
    predicted: int | None = None  # rows answered with it (None in metrics recorded before it was counted)


class EvalMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    accuracy: float
    precision: float
    recall: float
    f1: float
    eval_rows: int
    per_class: dict[str, ClassMetrics] = Field(default_factory=dict)
    # confusion[i][j]: rows of true class i predicted as j, classes in the model's label order.
    confusion: list[list[int]] = Field(default_factory=list)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> EvalMetrics:
    """Macro averages over the labels that occur in y_true or y_pred (as scikit-learn does),
    each label's own precision, recall, F1 and support, and the confusion matrix.

    A label never predicted has precision 0 (no division warning), never true has recall 0.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items, y_pred {len(y_pred)}")
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for t, p in zip(y_true, y_pred, strict=True):
        confusion[t][p] += 1
    n = len(y_true)
    if n == 0:
        return EvalMetrics(accuracy=0.0, precision=0.0, recall=0.0, f1=0.0, eval_rows=0, confusion=confusion)
    per_class: dict[str, ClassMetrics] = {}
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(confusion[j][i] for j in range(k))
        support = sum(confusion[i])
        if predicted == 0 and support == 0:
            continue
        prec = tp / predicted if predicted else 0.0
        rec = tp / support if support else 0.0
        per_class[label] = ClassMetrics(precision=prec, recall=rec, f1=2 * prec * rec / (prec + rec) if prec + rec else 0.0,
                                        support=support, predicted=predicted)
    present = list(per_class.values())
    return EvalMetrics(
        accuracy=sum(confusion[i][i] for i in range(k)) / n,
        precision=sum(c.precision for c in present) / len(present),
        recall=sum(c.recall for c in present) / len(present),
        f1=sum(c.f1 for c in present) / len(present),
        eval_rows=n,
        per_class=per_class,
        confusion=confusion,
    )

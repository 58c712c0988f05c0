"""Evaluation: the one metrics type of a version (``EvalMetrics``, stored in manifests and
job records, compared by the gate) and how classification computes it. Pure Python."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict


class EvalMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    accuracy: float
    precision: float
    recall: float
    f1: float
    eval_rows: int


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> EvalMetrics:
    """Macro averages over the labels that occur in y_true or y_pred (as scikit-learn does).

    A label never predicted has precision 0 (no division warning), never true has recall 0.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items, y_pred {len(y_pred)}")
    n = len(y_true)
    if n == 0:
        return EvalMetrics(accuracy=0.0, precision=0.0, recall=0.0, f1=0.0, eval_rows=0)
    tp = [0] * num_labels
    fp = [0] * num_labels
    fn = [0] * num_labels
    for t, p in zip(y_true, y_pred, strict=True):
        if t == p:
            tp[t] += 1
        else:
            fp[p] += 1
            fn[t] += 1
    present = [k for k in range(num_labels) if tp[k] + fp[k] + fn[k] > 0]
    precisions, recalls, f1s = [], [], []
    for k in present:
        prec = tp[k] / (tp[k] + fp[k]) if tp[k] + fp[k] else 0.0
        rec = tp[k] / (tp[k] + fn[k]) if tp[k] + fn[k] else 0.0
        precisions.append(prec)
        recalls.append(rec)
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return EvalMetrics(
        accuracy=sum(tp) / n,
        precision=sum(precisions) / len(present),
        recall=sum(recalls) / len(present),
        f1=sum(f1s) / len(present),
        eval_rows=n,
    )

"""Lineage: which version served a prediction, that version's ancestry back to the base
model, and for each version the rows it trained on (``data/trained_on.parquet`` beside its
manifest: fresh feedback ids, the replay sample of earlier feedback and of the seed), the
golden set it was judged on, and its feedback-to-serving time. Read by `tuneloop lineage`.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from tuneloop.core.errors import UnknownPrediction
from tuneloop.core.serving_time import ServingTime
from tuneloop.store.records import PredictionLog
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry

TRAINED_ON = "trained_on"


def _version_entry(registry: Registry, m: Manifest, with_rows: bool) -> dict[str, Any]:
    trained = registry.table(m.model, m.version, TRAINED_ON)
    rows = trained.to_pylist() if trained is not None else []
    by_source = Counter(r["source"] for r in rows)
    entry: dict[str, Any] = {
        "version": m.version,
        "parent": m.parent,
        "status": m.status,
        "created_at": m.created_at,
        "job_id": m.job_id,
        "trained_rows": dict(sorted(by_source.items())),
        # Fresh feedback (new to this version) and replayed feedback (from the reservoir).
        "feedback_ids": sorted(r["feedback_id"] for r in rows if r["source"] == "feedback"),
        "replayed_feedback_ids": sorted(r["feedback_id"] for r in rows if r["source"] == "replay"),
        "seed": m.data.get("seed"),
        "golden": m.data.get("golden"),
        "watermark": m.data.get("watermark"),
        "gate": m.gate.reason if m.gate else None,
        "distilled_from": m.distilled_from,
        "serving_time": m.serving_time.model_dump() if m.serving_time else None,
        "rows_file": registry.table_path(m.model, m.version, TRAINED_ON) if trained is not None else None,
    }
    if with_rows:
        entry["rows"] = [{k: v for k, v in r.items() if k != "created_at"} for r in rows]
    return entry


def version_lineage(registry: Registry, model: str, version: str, with_rows: bool = False) -> dict[str, Any]:
    """``version`` and its ancestors, newest first, each with what it trained on. Raises
    UnknownVersion (tuneloop.core.errors)."""
    ancestry = []
    current: str | None = version
    while current is not None:
        manifest = registry.manifest(model, current)
        ancestry.append(_version_entry(registry, manifest, with_rows))
        current = manifest.parent
    return {"model": model, "version": version, "base_model": manifest.base_model, "ancestry": ancestry}


def prediction_lineage(registry: Registry, log: PredictionLog, models: list[str], prediction_id: str,
                       with_rows: bool = False) -> dict[str, Any]:
    """Which version served ``prediction_id``, that version's lineage, and which versions
    trained on feedback given about the prediction (a rejected one says so; versions
    published before ``trained_on`` had a prediction_id column cannot tell). Raises
    UnknownPrediction."""
    record = log.lookup(models, prediction_id)
    if record is None:
        raise UnknownPrediction(prediction_id, " in the prediction log (it keeps predictions.sample_rate "
                                               "of predictions for predictions.retention_days)")
    model, version = record["model"], record["version"]
    learned_by = []
    for m in registry.versions(model):
        trained = registry.table(model, m.version, TRAINED_ON)
        if trained is not None and "prediction_id" in trained.column_names and \
                prediction_id in set(trained.column("prediction_id").to_pylist()):
            learned_by.append(m.version if m.status == "accepted" else f"{m.version} ({m.status})")
    return {
        "prediction": {"prediction_id": prediction_id, "model": model, "version": version,
                       "created_at": record["created_at"].isoformat() if record.get("created_at") else None},
        "feedback_trained_by": learned_by,
        **version_lineage(registry, model, version, with_rows),
    }


def describe(lineage: dict[str, Any]) -> list[str]:
    """The lineage as lines for a terminal."""
    lines = []
    if "prediction" in lineage:
        p = lineage["prediction"]
        learned = ", ".join(lineage["feedback_trained_by"]) or "no version yet"
        lines.append(f"prediction {p['prediction_id']}: model {p['model']}, served by {p['version']} "
                     f"at {p['created_at']}; feedback on it trained into: {learned}")
    for v in lineage["ancestry"]:
        lines.append(f"{v['version']}  {v['status']}  {v['created_at']}  parent {v['parent'] or lineage['base_model']}"
                     f"  job {v['job_id'] or '-'}")
        counts = ", ".join(f"{n} {source}" for source, n in v["trained_rows"].items()) or "no rows recorded"
        lines.append(f"    trained on: {counts}")
        if v["feedback_ids"]:
            lines.append(f"    fresh feedback ids: {v['feedback_ids'][0]} .. {v['feedback_ids'][-1]} "
                         f"({len(v['feedback_ids'])}); newest: {(v['watermark'] or {}).get('created_at')}")
        golden = v["golden"] or {}
        seed = v["seed"] or {}
        lines.append(f"    golden set: {golden.get('rows', 0)} rows, sha256 {golden.get('sha256') or '-'}; "
                     f"seed sha256 {seed.get('sha256') or '-'}")
        teacher = v.get("distilled_from")
        if teacher:
            metrics = teacher.get("teacher_metrics") or {}
            lines.append(f"    distilled from {teacher['model']} {teacher['version']} (accuracy "
                         f"{metrics.get('accuracy', float('nan')):.4f} on the golden set), temperature "
                         f"{teacher['temperature']:g}, alpha {teacher['alpha']:g}")
        if v["gate"]:
            lines.append(f"    gate: {v['gate']}")
        if v["serving_time"]:
            lines.append(f"    feedback to serving: {ServingTime.model_validate(v['serving_time']).describe()}")
        if v["rows_file"]:
            lines.append(f"    rows: {v['rows_file']}")
        for r in v.get("rows", []):  # one JSON object a row: what jq and a script read (a dict's repr was not)
            lines.append(f"      {json.dumps(r, default=str, ensure_ascii=False)}")
    lines.append(f"base model: {lineage['base_model']}")
    return lines

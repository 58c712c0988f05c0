"""`tuneloop feedback stats` as an operator reads it: what the feedback says of each serving
version, in aligned columns (``--json`` prints ``feedback_stats``' document as it is). Pure:
the statistics in, lines out.
"""

from __future__ import annotations

from typing import Any

from tuneloop.control.text_columns import columns


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def feedback_lines(stats: dict[str, Any]) -> list[str]:
    """The model's feedback in a few lines: the total, each label's count, each version's
    online accuracy (the share of feedback on its answers that agreed with them), its labels'
    online precision and recall where feedback judged them (right, wrong, missed), and the
    days."""
    model, total = stats["model"], stats["total"]
    if not total:
        return [f"{model}: no feedback yet"]
    replaced = stats.get("superseded") or 0
    lines = [f"{model}: {total} feedback record(s) count"
             + (f"; {replaced} earlier answer(s) on the same predictions were replaced by newer ones (latest wins)"
                if replaced else "")]
    if stats["by_label"]:
        lines.append("labels: " + ", ".join(f"{label} {n}" for label, n in stats["by_label"].items()))
    versions = stats["by_version"]
    if not versions:
        lines.append("no feedback on a prediction yet (feedback on a text alone judges no version)")
    else:
        lines.append("")
        lines.extend(columns([("VERSION", "FEEDBACK", "AGREED", "ONLINE ACCURACY")]
                              + [(version, str(seen["feedback"]), str(seen["agreed"]), _share(seen["online_accuracy"]))
                                 for version, seen in versions.items()]))
    for version, seen in versions.items():
        judged = seen.get("by_label") or {}
        if judged:
            lines.append("")
            lines.append(f"{version}, each label as feedback judged it:")
            rows = [("LABEL", "RIGHT", "WRONG", "MISSED", "PRECISION", "RECALL")]
            rows += [(label, str(q["right"]), str(q["wrong"]), str(q["missed"]), _share(q["precision"]),
                      _share(q["recall"])) for label, q in judged.items()]
            lines.extend(columns(rows, indent="  "))
    if stats["by_day"]:
        lines.append("")
        lines.append("days: " + ", ".join(f"{day} {n}" for day, n in stats["by_day"].items()))
    return lines


def key_lines(model: str, keys: list[dict[str, Any]]) -> list[str]:
    """`tuneloop feedback keys`: each key's agreement with production (on feedback about its
    predictions) and with the other keys (on texts they answered too), and the quarantine's
    verdict on it, a row a key."""
    if not keys:
        return [f"{model}: no feedback yet"]
    rows = [("KEY", "ROWS", "JUDGED", "WITH PRODUCTION", "SHARED TEXTS", "WITH PEERS", "QUARANTINE")]
    for k in keys:
        verdict = k.get("quarantine")
        said = "-" if verdict is None else (
            f"held since {verdict['since']}: {verdict['reason']}" if verdict["state"] == "quarantined"
            else f"released {verdict.get('released_at') or ''}".rstrip())
        rows.append((k["key_id"], str(k["rows"]), str(k["judged"]), _share(k["production_agreement"]),
                     str(k["shared_texts"]), _share(k["peer_agreement"]), said))
    return columns(rows)

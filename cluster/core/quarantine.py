"""Which feedback keys to hold out of training: a key whose answers are far off the rest.
Pure: the job computes it over its fresh feedback, the store keeps the verdicts.

Two signals, per API key (records carry the id of the key that sent them):

- **production**: on feedback about a prediction, how often the key agrees with what the
  production model served. Production passed the golden set, so an honest key agrees about
  as often as production is right there (its golden accuracy), and as often as other keys
  do. A key agreeing ``max_gap`` less often than that reference is flagged.
- **peers**: on texts that other keys labelled too, how often the key gives the label most
  of them gave. Below ``min_peer_agreement`` it is flagged.

A round of flipped labels from one key agrees with production far less than production's
golden accuracy, whether or not other keys sent feedback.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tuneloop.core.tasks import Task

ANONYMOUS = "(no key)"  # feedback taken without a key, where the feedback role is open


def normalized(text: str) -> str:
    """The form in which texts are compared (shared texts, golden-set exclusion)."""
    return " ".join(text.split()).lower()


@dataclass
class KeyStats:
    key_id: str
    rows: int = 0
    judged: int = 0  # rows on a prediction, so with production's answer
    agreed: int = 0  # ... where the key said production was right
    shared: int = 0  # rows on a text another key labelled too
    agreed_with_peers: int = 0

    @property
    def production_agreement(self) -> float | None:
        return self.agreed / self.judged if self.judged else None

    @property
    def peer_agreement(self) -> float | None:
        return self.agreed_with_peers / self.shared if self.shared else None

    def as_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "rows": self.rows, "judged": self.judged,
                "production_agreement": self.production_agreement, "shared_texts": self.shared,
                "peer_agreement": self.peer_agreement}


def key_stats(rows: Iterable[dict[str, Any]], agrees: Callable[[dict[str, Any]], bool],
              label_of: Callable[[dict[str, Any]], str]) -> dict[str, KeyStats]:
    """Per key: its rows, its agreement with production (``agrees`` on rows that have a
    prediction) and with other keys on shared texts (``label_of`` a row, compared with the
    most common label the other keys gave the same text)."""
    stats: dict[str, KeyStats] = {}
    by_text: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in rows:
        key = row.get("key_id") or ANONYMOUS
        s = stats.setdefault(key, KeyStats(key))
        s.rows += 1
        if row.get("prediction_id") is not None:
            s.judged += 1
            s.agreed += bool(agrees(row))
        by_text[normalized(row["text"])].append((key, label_of(row)))
    for answers in by_text.values():
        per_key: dict[str, Counter] = defaultdict(Counter)
        for key, label in answers:
            per_key[key][label] += 1
        if len(per_key) < 2:
            continue
        everyone = sum(per_key.values(), Counter())
        for key, label in answers:  # the other keys' labels: everyone's less this key's own
            others = everyone - per_key[key]
            top = max(others.values())
            stats[key].shared += 1
            stats[key].agreed_with_peers += others[label] == top
    return stats


def task_key_stats(task: Task, rows: Iterable[dict[str, Any]]) -> dict[str, KeyStats]:
    """``key_stats`` by ``task``'s rules: its agreement with a prediction, its label (stratum)."""
    return key_stats(rows, task.agrees, lambda r: task.stratum({c: r[c] for c in task.target_columns}))


def flag_keys(stats: dict[str, KeyStats], production_accuracy: float | None, *, min_rows: int, max_gap: float,
              min_shared_texts: int, min_peer_agreement: float) -> dict[str, str]:
    """The keys to quarantine, each with the reason in words. The production reference is
    the other keys' agreement when they judged at least ``min_rows`` predictions, else
    production's golden accuracy; no reference, no production check."""
    flags: dict[str, str] = {}
    for key, s in stats.items():
        if key == ANONYMOUS:
            continue  # no key to hold; open feedback is the operator's choice
        reasons = []
        others_judged = sum(o.judged for k, o in stats.items() if k != key)
        others_agreed = sum(o.agreed for k, o in stats.items() if k != key)
        if others_judged >= min_rows:
            reference, of = others_agreed / others_judged, f"other keys' {others_agreed / others_judged:.0%}"
        elif production_accuracy is not None:
            reference, of = production_accuracy, f"production's golden accuracy {production_accuracy:.0%}"
        else:
            reference = None
        if reference is not None and s.judged >= min_rows and s.production_agreement < reference - max_gap:
            reasons.append(f"agrees with production on {s.production_agreement:.0%} of {s.judged} predictions, "
                           f"against {of} (allowed gap {max_gap:.0%})")
        if s.shared >= min_shared_texts and s.peer_agreement < min_peer_agreement:
            reasons.append(f"gives other keys' label on {s.peer_agreement:.0%} of {s.shared} shared texts "
                           f"(at least {min_peer_agreement:.0%} expected)")
        if reasons:
            flags[key] = "; ".join(reasons)
    return flags

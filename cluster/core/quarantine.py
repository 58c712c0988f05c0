"""Which feedback keys to hold out of training: a key whose answers are far off the rest.
Pure: the job computes it over its fresh feedback, the store keeps the verdicts.

Two signals, per API key (records carry the id of the key that sent them):

- **production**: on feedback about a prediction, how often the key agrees with what the
  production model served. Production passed the golden set, so an honest key agrees about
  as often as production is right there (its golden accuracy), and as often as other keys
  do: the median of those. A key agreeing ``max_gap`` less often than that reference is flagged.
- **peers**: on texts that other keys labelled too, how often the key gives the label most
  of them gave. Below ``min_peer_agreement`` it is flagged.

A round of flipped labels from one key agrees with production far less than production's
golden accuracy, whether or not other keys sent feedback.
"""

from __future__ import annotations

import json
import statistics
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from tuneloop.core.tasks import Task

ANONYMOUS = "(no key)"  # feedback taken without a key, where the feedback role is open


def normalized(text: str) -> str:
    """The form in which texts are compared (shared texts, golden-set exclusion, the newest
    answer per text): one Unicode composition, NFC, as labels are compared, so a seed's
    "café" written by a macOS tool (NFD: e and a combining accent) and a browser's are one
    text; without format characters (zero-width spaces and joiners: invisible, and
    tokenizers drop them); blanks collapsed; lower case. Compared as they came, golden texts
    sent back in the other form trained while judging the candidate."""
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFC", text) if unicodedata.category(c) != "Cf")
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
              label_of: Callable[[dict[str, Any]], str], held: Collection[str] = ()) -> dict[str, KeyStats]:
    """Per key: its rows, its agreement with production (``agrees`` on rows that have a
    prediction) and with other keys on shared texts. On a text, each key has one vote: its
    newest label (``label_of`` a row); a key shares the text when at least two other keys
    not ``held`` (quarantined already) labelled it and most of them gave one label. A key
    posting a text many times outvoted two honest keys, and two keys alone contradicting
    each other on a text flagged both, the honest one too."""
    stats: dict[str, KeyStats] = {}
    votes: dict[str, dict[str, str]] = defaultdict(dict)  # text -> key -> its newest label
    for row in rows:
        key = row.get("key_id") or ANONYMOUS
        s = stats.setdefault(key, KeyStats(key))
        s.rows += 1
        if row.get("prediction_id") is not None:
            s.judged += 1
            s.agreed += bool(agrees(row))
        votes[normalized(row["text"])][key] = label_of(row)
    for by_key in votes.values():
        for key, label in by_key.items():
            others = Counter(other for k, other in by_key.items() if k != key and k not in held)
            voters = sum(others.values())
            if voters < 2:
                continue
            top, count = others.most_common(1)[0]
            if count * 2 <= voters:
                continue  # the other keys split: no label to agree with
            stats[key].shared += 1
            stats[key].agreed_with_peers += label == top
    return stats


def canonical_target(value: Any) -> str:
    """A row's target in one spelling whatever its order: lists (labels, entity spans) sorted,
    mappings by key; two keys giving the same entities in another order agree."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in sorted(v.items())}
        if isinstance(v, (list, tuple)):
            return sorted((plain(x) for x in v), key=lambda x: json.dumps(x, sort_keys=True, default=str))
        return v
    return json.dumps(plain(value), sort_keys=True, default=str)


def task_key_stats(task: Task, rows: Iterable[dict[str, Any]], held: Collection[str] = ()) -> dict[str, KeyStats]:
    """``key_stats`` by ``task``'s rules: its agreement with a prediction; its whole target
    (every entity span, not the types a row mentions, which agreed whatever spans a key
    tagged)."""
    return key_stats(rows, task.agrees, lambda r: canonical_target({c: r[c] for c in task.target_columns}), held)


def flag_keys(stats: dict[str, KeyStats], production_accuracy: float | None, *, min_rows: int, max_gap: float,
              min_shared_texts: int, min_peer_agreement: float, held: Collection[str] = ()) -> dict[str, str]:
    """The keys to quarantine, each with the reason in words. A key's production reference is
    the median of production's golden accuracy and each other key's agreement (those that
    judged at least ``min_rows`` predictions and are not ``held``); no reference, no
    production check. A median, not the other keys' rows pooled: two keys flipping labels
    together pulled the pooled reference down to where neither was flagged."""
    flags: dict[str, str] = {}
    for key, s in stats.items():
        if key == ANONYMOUS:
            continue  # no key to hold; open feedback is the operator's choice
        reasons = []
        reference, of = _production_reference(key, stats, production_accuracy, min_rows, held)
        if reference is not None and s.judged >= min_rows and s.production_agreement < reference - max_gap:
            reasons.append(f"agrees with production on {s.production_agreement:.0%} of {s.judged} predictions, "
                           f"against {of} (allowed gap {max_gap:.0%})")
        if s.shared >= min_shared_texts and s.peer_agreement < min_peer_agreement:
            reasons.append(f"gives other keys' label on {s.peer_agreement:.0%} of {s.shared} shared texts "
                           f"(at least {min_peer_agreement:.0%} expected)")
        if reasons:
            flags[key] = "; ".join(reasons)
    return flags


def _production_reference(key: str, stats: dict[str, KeyStats], production_accuracy: float | None,
                          min_rows: int, held: Collection[str]) -> tuple[float | None, str]:
    """(what ``key``'s agreement with production is held to, that reference in words)."""
    others = [o.production_agreement for k, o in stats.items() if k != key and k not in held and o.judged >= min_rows]
    points = others + ([production_accuracy] if production_accuracy is not None else [])
    if not points:
        return None, ""
    median = statistics.median(points)
    if not others:
        return median, f"production's golden accuracy {median:.0%}"
    golden = f" and production's golden accuracy {production_accuracy:.0%}" if production_accuracy is not None else ""
    return median, f"{median:.0%}, the median of {len(others)} other key(s){golden}"

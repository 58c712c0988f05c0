"""Quarantine of feedback keys (cluster/core/quarantine.py, cluster/store/quarantine.py):
which keys are far off the rest, on numbers alone, and the book that holds the verdicts."""

import pytest

from tuneloop.core.errors import NotQuarantined
from tuneloop.core.quarantine import ANONYMOUS, flag_keys, key_stats
from tuneloop.store.quarantine import QuarantineBook
from tuneloop.store.storage import Storage

RULES = {"min_rows": 20, "max_gap": 0.4, "min_shared_texts": 10, "min_peer_agreement": 0.5}


def _rows(key, n, agree, start=0, text="t{}", label=None):
    """n feedback rows on predictions from ``key``, the first ``agree`` saying production was right."""
    return [{"key_id": key, "prediction_id": f"p{start + i}", "text": text.format(start + i),
             "label": label or ("pos" if i < agree else "neg"), "predicted_label": "pos"} for i in range(n)]


def _agrees(row):
    return row["label"] == row["predicted_label"]


def _label(row):
    return row["label"]


def test_a_key_agreeing_far_less_than_the_others_is_flagged():
    rows = _rows("honest1", 50, 45) + _rows("honest2", 50, 43, start=100) + _rows("flipper", 40, 4, start=200)
    stats = key_stats(rows, _agrees, _label)
    assert stats["flipper"].production_agreement == 0.1 and stats["honest1"].judged == 50
    flags = flag_keys(stats, production_accuracy=0.9, **RULES)
    assert set(flags) == {"flipper"} and "10% of 40 predictions, against other keys' 88%" in flags["flipper"]


def test_alone_a_key_is_judged_against_productions_golden_accuracy():
    stats = key_stats(_rows("flipper", 40, 4), _agrees, _label)
    assert "production's golden accuracy 90%" in flag_keys(stats, production_accuracy=0.9, **RULES)["flipper"]
    # A shifted domain where production is right 60% of the time: an honest key is not flagged.
    honest = key_stats(_rows("honest", 40, 24), _agrees, _label)
    assert flag_keys(honest, production_accuracy=0.9, **RULES) == {}
    assert flag_keys(stats, production_accuracy=None, **RULES) == {}  # no reference: no judgement


def test_too_few_rows_and_anonymous_feedback_are_never_flagged():
    few = key_stats(_rows("new", 19, 0), _agrees, _label)
    assert flag_keys(few, production_accuracy=0.9, **RULES) == {}
    anonymous = key_stats([{**r, "key_id": None} for r in _rows("x", 40, 0)], _agrees, _label)
    assert set(anonymous) == {ANONYMOUS} and flag_keys(anonymous, production_accuracy=0.9, **RULES) == {}


def test_a_key_contradicting_other_keys_on_shared_texts_is_flagged():
    # Texts without a prediction (no production answer): only the peers signal applies.
    a = [{**r, "prediction_id": None} for r in _rows("a", 12, 12, text="shared {}")]
    b = [{**r, "prediction_id": None} for r in _rows("b", 12, 12, text="shared {}")]
    c = [{**r, "prediction_id": None} for r in _rows("c", 12, 0, text="shared {}")]
    stats = key_stats(a + b + c, _agrees, _label)
    assert stats["c"].shared == 12 and stats["c"].peer_agreement == 0.0 and stats["a"].peer_agreement == 1.0
    flags = flag_keys(stats, production_accuracy=None, **RULES)
    assert set(flags) == {"c"} and "0% of 12 shared texts" in flags["c"]


def test_the_book_quarantines_releases_and_never_requarantines(tmp_path):
    book = QuarantineBook(Storage(str(tmp_path)))
    assert book.quarantine("m", {"bbbbbbbb": "far off"}, {"bbbbbbbb": {"rows": 40}}) == {"bbbbbbbb"}
    verdict = book.verdicts("m")["bbbbbbbb"]
    assert verdict.state == "quarantined" and verdict.reason == "far off" and verdict.stats == {"rows": 40}
    released = book.release("m", "bbbbbbbb")
    assert released.state == "released" and released.released_at
    assert book.quarantine("m", {"bbbbbbbb": "still off"}, {}) == set()  # an admin's release stands
    with pytest.raises(NotQuarantined, match="'bbbbbbbb' is not quarantined for model 'm'"):
        book.release("m", "bbbbbbbb")
    with pytest.raises(NotQuarantined):
        book.release("other", "cccccccc")

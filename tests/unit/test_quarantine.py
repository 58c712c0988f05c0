"""Quarantine of feedback keys (cluster/core/quarantine.py, cluster/store/quarantine.py):
which keys are far off the rest, on numbers alone, and the book that holds the verdicts."""

import pytest

from tuneloop.core.errors import NotQuarantined
from tuneloop.core.quarantine import ANONYMOUS, flag_keys, key_stats, normalized, task_key_stats
from tuneloop.core.tasks.token_classification import TokenClassification
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
    assert set(flags) == {"flipper"}
    assert "10% of 40 predictions, against 90%, the median of 2 other key(s) and production's golden accuracy 90%" \
        in flags["flipper"]


def test_two_keys_flipping_together_are_both_flagged():
    # Pooled, the other keys' rows (5 of 100 and 26 of 30 agreeing) made a reference of 24%,
    # which neither flipper missed by the allowed gap.
    rows = _rows("flip1", 100, 5) + _rows("flip2", 100, 5, start=100) + _rows("honest", 30, 26, start=200)
    flags = flag_keys(key_stats(rows, _agrees, _label), production_accuracy=0.9, **RULES)
    assert set(flags) == {"flip1", "flip2"} and "against 87%" in flags["flip1"]
    # A key quarantined already sets no other key's reference: the flipper alone, judged on
    # the honest key and production, is flagged; and the honest one is not.
    stats = key_stats(rows, _agrees, _label, held={"flip2"})
    assert set(flag_keys(stats, production_accuracy=0.9, held={"flip2"}, **RULES)) >= {"flip1"}
    assert "honest" not in flag_keys(stats, production_accuracy=0.9, held={"flip2"}, **RULES)


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
    assert stats["c"].shared == 12 and stats["c"].peer_agreement == 0.0
    assert stats["a"].shared == 0  # a's others, b and c, split: no label to agree with
    flags = flag_keys(stats, production_accuracy=None, **RULES)
    assert set(flags) == {"c"} and "0% of 12 shared texts" in flags["c"]


def _unjudged(key, n, label, times=1):
    """``key`` labelling texts "shared 0".. "shared n-1" ``label``, each ``times`` times, with no prediction."""
    return [{**r, "prediction_id": None} for r in _rows(key, n, 0, text="shared {}", label=label)] * times


def test_a_key_posting_a_text_many_times_has_one_vote_and_cannot_flag_honest_keys():
    stats = key_stats(_unjudged("a", 12, "pos") + _unjudged("b", 12, "pos") + _unjudged("spam", 12, "neg", times=3),
                      _agrees, _label)
    assert stats["a"].shared == 0  # a's others, b (pos) and spam (neg, one vote): a split
    assert stats["spam"].shared == 12 and stats["spam"].rows == 36
    assert set(flag_keys(stats, production_accuracy=None, **RULES)) == {"spam"}


def test_two_keys_alone_contradicting_each_other_are_not_judged_by_peers():
    stats = key_stats(_unjudged("a", 12, "pos") + _unjudged("b", 12, "neg"), _agrees, _label)
    assert stats["a"].shared == 0 and stats["b"].shared == 0
    assert flag_keys(stats, production_accuracy=None, **RULES) == {}


def test_a_quarantined_key_does_not_vote_on_shared_texts():
    rows = _unjudged("a", 12, "pos") + _unjudged("held1", 12, "neg") + _unjudged("held2", 12, "neg")
    assert flag_keys(key_stats(rows, _agrees, _label), production_accuracy=None, **RULES) == \
        {"a": "gives other keys' label on 0% of 12 shared texts (at least 50% expected)"}
    held = {"held1", "held2"}
    assert "a" not in flag_keys(key_stats(rows, _agrees, _label, held=held), production_accuracy=None, held=held,
                                **RULES)


def test_entity_feedback_agrees_with_peers_only_on_the_same_spans():
    task = TokenClassification(["PER", "LOC"])
    spans = [{"start": 0, "end": 4, "label": "PER"}, {"start": 10, "end": 14, "label": "LOC"}]  # John, home

    def rows(key, spans):
        return [{"key_id": key, "prediction_id": None, "text": f"John went home {i}", "entities": spans}
                for i in range(12)]
    wrong_span = [{"start": 5, "end": 9, "label": "PER"}, spans[1]]  # "went": the same types, another span
    stats = task_key_stats(task, rows("a", spans) + rows("b", list(reversed(spans))) + rows("c", wrong_span))
    assert stats["c"].shared == 12 and stats["c"].peer_agreement == 0.0
    assert stats["a"].shared == 0  # a's others, b and c, split
    d = task_key_stats(task, rows("a", spans) + rows("b", list(reversed(spans))) + rows("d", spans))
    assert d["b"].shared == 12 and d["b"].peer_agreement == 1.0  # the same entities in another order agree


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


@pytest.mark.parametrize("content", ['{"abc": {"key_id": "abc"', '{"abc": {"key_id": "abc"}}', '[1, 2]'])
def test_a_book_cut_mid_write_or_edited_by_hand_is_named_not_a_traceback(tmp_path, content):
    """Read raw, it raised JSONDecodeError or pydantic's ValidationError: a traceback at
    `tuneloop feedback release`, a 500 at the quarantine endpoints, and every rollout look and
    job of the model failed."""
    from tuneloop.core.errors import CorruptStoredFile

    book = QuarantineBook(Storage(str(tmp_path)))
    (tmp_path / "registry/m").mkdir(parents=True)
    (tmp_path / "registry/m/quarantine.json").write_text(content)
    for read in (lambda: book.verdicts("m"), lambda: book.release("m", "abc"),
                 lambda: book.quarantine("m", {"dddddddd": "off"}, {})):
        with pytest.raises(CorruptStoredFile, match="quarantine.json"):
            read()


def test_texts_compare_in_one_unicode_form_without_invisible_characters():
    """A seed's text written in NFD (macOS tools) and the same text sent back in NFC (a
    browser) compared as two texts: golden texts trained while judging the candidate."""
    composed, decomposed = "Caf\u00e9 num\u00e9ro 3", "Cafe\u0301 nume\u0301ro 3"
    assert normalized(composed) == normalized(decomposed) == "caf\u00e9 num\u00e9ro 3"
    assert normalized("hello\u200bworld\ufeff") == normalized("helloworld")
    assert normalized("  Two   words\n") == "two words"
    assert normalized("na\u00efve") != normalized("naive")  # a letter's accent is no format character

"""The gate's three checks (golden set, fresh feedback by McNemar's exact test, sanity),
each recorded with its numbers. Pure; milliseconds."""

from __future__ import annotations

import math

import pytest

from tuneloop.core.evaluation import classification_metrics
from tuneloop.core.config import GateConfig
from tuneloop.core.gate import Evidence, decide, fisher_lower, mcnemar_exact

LABELS = ["negative", "positive"]
RULES = GateConfig()  # margins 0.01 and 0.05, alpha 0.05, 30 fresh rows for the test


def _golden(right_neg: int, right_pos: int, n: int = 100):
    """Golden metrics with n/2 rows of each class, ``right_*`` of them answered right."""
    half = n // 2
    y_true = [0] * half + [1] * half
    y_pred = [0] * right_neg + [1] * (half - right_neg) + [1] * right_pos + [0] * (half - right_pos)
    return classification_metrics(y_true, y_pred, LABELS)


def _evidence(golden, parent_golden=None, cand=(), par=(), finite=True):
    return Evidence(metric="accuracy", golden=golden, parent_golden=parent_golden, fresh_candidate=list(cand),
                    fresh_parent=list(par), finite=finite)


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_exact(8, 2) == pytest.approx(sum(math.comb(10, k) for k in range(8, 11)) / 1024)
    assert mcnemar_exact(2, 8) > 0.9


def test_first_version_needs_only_sanity():
    d = decide(_evidence(_golden(40, 40)), RULES)
    assert d.accepted and [c.name for c in d.checks] == ["golden", "fresh", "sanity"]
    assert d.checks[0].numbers["accuracy"] == 0.8


def test_golden_accuracy_may_fall_by_the_margin_and_no_more():
    parent = _golden(45, 45)  # 0.90
    assert decide(_evidence(_golden(45, 44), parent), RULES).accepted  # 0.89: within 1 point
    d = decide(_evidence(_golden(44, 44), parent), RULES)  # 0.88
    assert not d.accepted and d.checks[0].name == "golden" and not d.checks[0].passed
    assert "0.8800 on the golden set is more than 0.01 below production's 0.9000" in d.reason


def test_a_golden_veto_says_whether_chance_could_explain_the_drop():
    """The margin stays a hard bound; the record tells a regression from a golden set too
    small to separate the two models."""
    parent = _golden(9, 9, n=20)  # 0.90
    small = Evidence(metric="accuracy", golden=_golden(8, 9, n=20), parent_golden=parent,
                     golden_candidate=[True] * 16 + [False, True, False, False],  # 17 right
                     golden_parent=[True] * 16 + [True, False, True, False])  # 18 right
    d = decide(small, RULES)  # one row lost: production alone right on 2, the candidate on 1
    assert not d.accepted and "chance could explain it" in d.reason
    assert d.checks[0].numbers["p_value_worse"] == pytest.approx(mcnemar_exact(2, 1))
    big = Evidence(metric="accuracy", golden=_golden(360, 352, n=800), parent_golden=_golden(380, 380, n=800),
                   golden_candidate=[True] * 712 + [False] * 88, golden_parent=[True] * 760 + [False] * 40)
    d = decide(big, RULES)  # 48 rows only production answers right, none only the candidate
    assert not d.accepted and "chance" not in d.reason and d.checks[0].numbers["p_value_worse"] < 1e-9


def test_a_class_losing_recall_fails_even_when_the_average_holds():
    parent = _golden(360, 360, n=800)  # recall 0.9 each
    candidate = _golden(400, 328, n=800)  # accuracy 0.91, but positive recall 0.82
    d = decide(_evidence(candidate, parent), RULES)
    assert not d.accepted and "for 'positive' 0.8200 < 0.9000" in d.reason and "Fisher" in d.reason
    assert d.checks[0].numbers["recall_drops"] == {"positive": (0.82, 0.9)}


def test_a_recall_drop_chance_explains_does_not_fail():
    # The same rates on 50 rows a class: 4 rows lost is what chance does (Fisher p 0.19).
    d = decide(_evidence(_golden(50, 41), _golden(45, 45)), RULES)
    assert d.accepted, d.reason
    assert d.checks[0].numbers["recall_drops_by_chance"] == {"positive": (0.82, 0.9)}


def test_a_class_drop_is_tested_on_the_classes_rows_paired_when_their_classes_are_known():
    """Both models answer the same rows: Fisher's test for two independent samples passed a
    candidate that lost 7 of the minority class's 40 rows and gained none (p 0.042, above
    the Bonferroni level 0.025); McNemar on those rows gives 2^-7."""
    classes = ["a"] * 360 + ["b"] * 40
    production = [True] * 340 + [False] * 20 + [True] * 36 + [False] * 4
    candidate = [True] * 352 + [False] * 8 + [True] * 29 + [False] * 11  # b's right rows: a subset of production's
    labels = ["a", "b"]

    def metrics(right):
        return classification_metrics([0 if k == "a" else 1 for k in classes],
                                      [(0 if k == "a" else 1) if r else (1 if k == "a" else 0)
                                       for k, r in zip(classes, right)], labels)
    unpaired = Evidence(metric="accuracy", golden=metrics(candidate), parent_golden=metrics(production),
                        golden_candidate=candidate, golden_parent=production)
    assert decide(unpaired, RULES).accepted  # Fisher's: b's drop is "chance"
    paired = unpaired.model_copy(update={"golden_classes": classes})
    d = decide(paired, RULES)
    assert not d.accepted and "'b' 0.7250 < 0.9000" in d.reason and "McNemar's exact test on the class's rows" in d.reason


def test_a_fall_of_exactly_the_margin_passes_whatever_the_float():
    rules = GateConfig(golden_margin=0.05)
    parent = _golden(260, 260, n=1000)  # 0.52
    assert decide(_evidence(_golden(235, 235, n=1000), parent), rules).accepted  # 0.47: exactly 5 points


def test_fisher_lower_matches_the_hypergeometric_tail():
    assert fisher_lower(5, 5, 10) == pytest.approx(0.6719, abs=1e-4)  # scipy.stats.fisher_exact, alternative="less"
    assert fisher_lower(0, 10, 10) == pytest.approx(1 / math.comb(20, 10))
    assert fisher_lower(10, 0, 10) == 1.0
    assert fisher_lower(0, 3, 3) == 0.05  # exactly the level: not a significant drop (floats made it 0.0499...)


def test_the_exact_tests_agree_with_exact_integers_and_take_milliseconds_at_20000_rows():
    """Summed in exact integers, 10,000 discordant rows took 3.4 s and a golden set of
    20,000 rows 25 s, inside a job."""
    import time

    for b, c in [(3, 9), (40, 25), (130, 170), (1500, 1600)]:  # the last in log space
        exact = sum(math.comb(b + c, k) for k in range(b, b + c + 1)) / 2 ** (b + c)
        assert mcnemar_exact(b, c) == pytest.approx(exact, rel=1e-9)
    for ours, theirs, n in [(80, 90, 100), (300, 280, 400), (900, 930, 1100)]:  # the last in log space
        right = ours + theirs
        exact = sum(math.comb(right, x) * math.comb(2 * n - right, n - x)
                    for x in range(max(0, right - n), ours + 1)) / math.comb(2 * n, n)
        assert fisher_lower(ours, theirs, n) == pytest.approx(exact, rel=1e-9)
    start = time.perf_counter()
    assert mcnemar_exact(5000, 5000) == pytest.approx(0.50399, abs=1e-5)
    assert fisher_lower(18000, 18500, 20000) < 1e-15
    assert time.perf_counter() - start < 0.5


def test_many_classes_a_better_model_passes_and_a_traded_class_fails():
    """77 intents, 26 golden rows each (BANKING77's 2,000-row golden set): a better candidate
    that loses 2 rows of a few classes by chance passes; one that gives up a class fails."""
    labels = [f"intent_{i}" for i in range(77)]
    truth = [k for k in range(77) for _ in range(26)]

    def answers(right_per_class: dict[int, int], default: int) -> list[int]:
        out = []
        for k in range(77):
            right = right_per_class.get(k, default)
            out += [k] * right + [(k + 1) % 77] * (26 - right)
        return out

    parent = classification_metrics(truth, answers({}, 22), labels)
    better = classification_metrics(truth, answers({3: 20, 40: 20, 70: 19}, 24), labels)
    d = decide(Evidence(metric="accuracy", golden=better, parent_golden=parent), RULES)
    assert d.accepted, d.reason
    assert set(d.checks[0].numbers["recall_drops_by_chance"]) == {"intent_3", "intent_40", "intent_70"}
    traded = classification_metrics(truth, answers({5: 4}, 24), labels)
    d = decide(Evidence(metric="accuracy", golden=traded, parent_golden=parent), RULES)
    assert not d.accepted and d.checks[0].numbers["recall_drops"] == {"intent_5": (0.1538, 0.8462)}


def test_fresh_rows_need_the_candidate_not_to_lose_and_record_whether_its_win_is_chance():
    parent = _golden(45, 45)
    # 40 rows: the candidate alone is right on 10, production alone on 1: p ~ 0.006.
    cand = [True] * 10 + [False] * 1 + [True] * 29
    par = [False] * 10 + [True] * 1 + [True] * 29
    d = decide(_evidence(parent, parent, cand, par), RULES)
    assert d.accepted and d.checks[1].numbers["p_value"] < 0.05 and "win (shown at 0.05)" in d.checks[1].detail
    # 5 against 3 on 40 rows is no evidence of a win (p ~ 0.36), but no loss either: it was
    # rejected, where 2 against 2 (too few disagreements for the test) passed.
    cand = [True] * 5 + [False] * 3 + [True] * 32
    par = [False] * 5 + [True] * 3 + [True] * 32
    d = decide(_evidence(parent, parent, cand, par), RULES)
    assert d.accepted and "beats production on 40 fresh rows" in d.checks[1].detail
    assert d.checks[1].numbers["p_value"] > 0.05 and "win (not shown at 0.05)" in d.checks[1].detail
    d = decide(_evidence(parent, parent, par, cand), RULES)  # 3 against 5: it loses
    assert not d.accepted and "loses to production on 40 fresh rows" in d.reason


def test_with_too_few_disagreements_for_the_test_the_candidate_must_not_lose():
    parent = _golden(45, 45)
    # Production right on 39 of 40: the candidate can win at most one row, p >= 0.5.
    cand = [True] * 40
    par = [False] + [True] * 39
    d = decide(_evidence(parent, parent, cand, par), RULES)
    assert d.accepted and "p_value" not in d.checks[1].numbers and "1 right where production was wrong, 0 the" \
        in d.checks[1].detail
    d = decide(_evidence(parent, parent, par, cand), RULES)
    assert not d.accepted and "loses to production on 40 fresh rows" in d.reason


def test_few_fresh_rows_only_need_not_lose():
    parent = _golden(45, 45)
    assert decide(_evidence(parent, parent, [True, True], [True, True]), RULES).accepted
    d = decide(_evidence(parent, parent, [False, True], [True, True]), RULES)
    assert not d.accepted and "loses to production on 2 fresh rows" in d.reason
    with pytest.raises(ValueError, match="paired"):
        decide(_evidence(parent, parent, [True], []), RULES)


def test_sanity_refuses_non_finite_outputs_and_a_collapse_to_one_class():
    d = decide(_evidence(_golden(45, 45), finite=False), RULES)
    assert not d.accepted and "non-finite" in d.reason
    collapsed = _golden(50, 0)  # predicts "negative" for everything
    d = decide(_evidence(collapsed, _golden(45, 45)), RULES.model_copy(update={"golden_margin": 1.0,
                                                                               "class_recall_margin": 1.0}))
    assert not d.accepted and "predicts one class for a golden set of 2 classes (production predicts 2)" in d.reason
    # Not a regression where production predicts one class already, nor for a first version.
    assert decide(_evidence(collapsed, collapsed), RULES).accepted
    first = decide(_evidence(collapsed), RULES)
    assert first.accepted and "the first version predicts one class" in first.reason
    # A golden set of one class cannot show a collapse: said so, not "no collapse".
    one_class = classification_metrics([1] * 10, [1] * 10, LABELS)
    sanity = decide(_evidence(one_class), RULES).checks[-1]
    assert sanity.passed and "the golden set holds one class, so a collapse" in sanity.detail


def test_the_metric_compared_is_the_tasks():
    parent, candidate = _golden(45, 45), _golden(45, 44)
    e = Evidence(metric="f1", golden=candidate, parent_golden=parent)
    d = decide(e, GateConfig(golden_margin=0.0))
    assert not d.accepted and d.checks[0].detail.startswith("f1 ")


def test_without_a_golden_set_the_golden_check_says_so_and_fresh_rows_must_exist():
    empty = classification_metrics([], [], LABELS)
    d = decide(_evidence(empty, empty, cand=[True, True], par=[True, False]), RULES)
    assert d.accepted and d.checks[0].detail.startswith("no golden set")
    # Nothing at all to compare on (a feedback-only model's job with eval_fraction 0 or a
    # handful of rows): accepted before, production replaced on no evidence.
    d = decide(_evidence(empty, empty), RULES)
    assert not d.accepted and "nothing shows the candidate is not worse" in d.reason
    assert decide(_evidence(empty), RULES).accepted  # a first version has nothing to protect

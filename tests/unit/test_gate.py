"""The gate's three checks (golden set, fresh feedback by McNemar's exact test, sanity),
each recorded with its numbers. Pure; milliseconds."""

from __future__ import annotations

import math

import pytest

from tuneloop.core.evaluation import classification_metrics
from tuneloop.core.config import GateConfig
from tuneloop.core.gate import Evidence, decide, mcnemar_exact

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


def test_a_class_losing_recall_fails_even_when_the_average_holds():
    parent = _golden(45, 45)  # recall 0.9 each
    candidate = _golden(50, 41)  # accuracy 0.91, but positive recall 0.82
    d = decide(_evidence(candidate, parent), RULES)
    assert not d.accepted and "positive 0.8200 < 0.9000" in d.reason
    assert d.checks[0].numbers["recall_drops"] == {"positive": (0.82, 0.9)}


def test_fresh_rows_need_a_significant_win_when_there_are_enough():
    parent = _golden(45, 45)
    # 40 rows: the candidate alone is right on 10, production alone on 1: p ~ 0.006.
    cand = [True] * 10 + [False] * 1 + [True] * 29
    par = [False] * 10 + [True] * 1 + [True] * 29
    d = decide(_evidence(parent, parent, cand, par), RULES)
    assert d.accepted and d.checks[1].numbers["p_value"] < 0.05
    # 5 against 3 on 40 rows is no evidence (p ~ 0.36): rejected.
    cand = [True] * 5 + [False] * 3 + [True] * 32
    par = [False] * 5 + [True] * 3 + [True] * 32
    d = decide(_evidence(parent, parent, cand, par), RULES)
    assert not d.accepted and "does not beat production on 40 fresh rows" in d.reason


def test_with_too_few_disagreements_for_the_test_the_candidate_must_not_lose():
    parent = _golden(45, 45)
    # Production right on 39 of 40: the candidate can win at most one row, p >= 0.5.
    cand = [True] * 40
    par = [False] + [True] * 39
    d = decide(_evidence(parent, parent, cand, par), RULES)
    assert d.accepted and "1 where they differ" in d.checks[1].detail
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


def test_the_metric_compared_is_the_tasks():
    parent, candidate = _golden(45, 45), _golden(45, 44)
    e = Evidence(metric="f1", golden=candidate, parent_golden=parent)
    d = decide(e, GateConfig(golden_margin=0.0))
    assert not d.accepted and d.checks[0].detail.startswith("f1 ")


def test_without_a_golden_set_the_golden_check_says_so():
    empty = classification_metrics([], [], LABELS)
    d = decide(_evidence(empty, empty), RULES)
    assert d.accepted and d.checks[0].detail.startswith("no golden set")

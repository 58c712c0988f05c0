"""The evaluation gate: may a freshly trained version replace production? Pure.

Three checks (four for a distilled student), each recorded with its numbers (``GateCheck``),
all of which must pass:

1. **Golden set** -- a per-model evaluation set that is frozen at v1 and never fed from
   feedback, so no client can choose what is on it. The candidate may lose at most
   ``golden_margin`` of the task's gate metric against production, and at most
   ``class_recall_margin`` of any class's recall (a model that trades a minority class for
   the majority is caught even when the average holds) -- a drop chance does not explain:
   McNemar's exact test on the class's rows (Fisher's where rows' classes are not known:
   multi-label, entities) at ``alpha`` shared among the classes. With 77 intents a golden set
   holds a few rows per class, and some class of a better model loses one or two by chance
   at every job; the bare margin rejected such candidates every time.
2. **Fresh feedback** -- the newest feedback, which the candidate did not train on: its
   membership is set by arrival time, not by a hash of the text a client could aim at. The
   candidate must not be right less often than production there. With at least
   ``min_fresh_rows`` rows, and enough rows where exactly one of the two is right for the
   test to reach ``alpha`` at all (k such rows give p >= 2^-k: 5 for 0.05), McNemar's exact
   test (one-sided) says whether its win is more than chance, recorded, not required: a
   required win rejected a candidate 5 rows up where one level with production passed. With
   no golden set either, it must have rows: a candidate is never promoted on no evidence.
3. **Teacher** (a distilled student only, ``ModelConfig.distill``) -- on the teacher's
   golden set, which the student is evaluated on, its gate metric may be at most
   ``max_gap`` below the teacher production's: the student exists to be faster at a bounded
   loss, and a student that fell further behind is not worth its speed.
4. **Sanity** -- every output finite, and on a golden set holding several classes the
   candidate predicts more than one of them where production did (a collapse is a
   regression; a production that predicts one class already is not made worse by it).

The first version has no production to compare: only finite outputs are required, and its
numbers are recorded. Why McNemar: both models answer the same rows, so only the rows where they
disagree carry information; a difference of accuracies ignores the pairing and needs far
more rows for the same confidence.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, Field

from tuneloop.core.config import GateConfig
from tuneloop.core.evaluation import EvalMetrics


class GateCheck(BaseModel):
    name: str  # "golden", "fresh", "teacher" or "sanity"
    passed: bool
    detail: str
    numbers: dict[str, Any] = Field(default_factory=dict)


class GateDecision(BaseModel):
    """The gate's verdict on a version, as its manifest and job record keep it."""

    accepted: bool
    reason: str
    checks: list[GateCheck] = Field(default_factory=list)


class TeacherEvidence(BaseModel):
    """A distilled student's teacher: its production version and that version's golden metrics."""

    model: str
    version: str
    golden: EvalMetrics
    max_gap: float


class Evidence(BaseModel):
    """What the training job measured, for one candidate against production (``parent``)."""

    metric: str  # the task's gate metric, a field of EvalMetrics
    golden: EvalMetrics
    parent_golden: EvalMetrics | None = None
    # Fresh rows, paired: whether the candidate / production answered each one right.
    fresh_candidate: list[bool] = Field(default_factory=list)
    fresh_parent: list[bool] = Field(default_factory=list)
    # The golden rows, paired the same way (empty when the job did not record them).
    golden_candidate: list[bool] = Field(default_factory=list)
    golden_parent: list[bool] = Field(default_factory=list)
    # Each of those rows' true class, for a task with one class a text (else empty): a
    # class's recall is then compared on its rows, paired.
    golden_classes: list[str] = Field(default_factory=list)
    finite: bool = True
    teacher: TeacherEvidence | None = None


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _exp_sum(logs: list[float]) -> float:
    """sum(exp(x) for x in logs), without overflow or underflow on the way."""
    top = max(logs)
    return math.exp(top) * math.fsum(math.exp(x - top) for x in logs)


# Both tests sum their tails in exact integers up to EXACT_MAX_ROWS (math.comb: a p-value that
# is exactly the level, 1/20 for Fisher's 0 of 3 against 3 of 3, stays at it, where floats
# made it 0.04999999999999998 and a significant drop), and in log space above: exact, they
# took 3.4 s for 10,000 discordant rows and 25 s for a golden set of 20,000 rows, inside a job.
EXACT_MAX_ROWS = 2000


def mcnemar_exact(candidate_only: int, parent_only: int) -> float:
    """One-sided p-value that the candidate is right more often than production, given the
    rows only the candidate got right and those only production got right: P(X >= b) for
    X ~ Binomial(b + c, 1/2). 1.0 with no discordant rows."""
    n = candidate_only + parent_only
    if n == 0:
        return 1.0
    if n <= EXACT_MAX_ROWS:
        return min(1.0, sum(math.comb(n, k) for k in range(candidate_only, n + 1)) / 2**n)
    return min(1.0, _exp_sum([_log_comb(n, k) - n * math.log(2) for k in range(candidate_only, n + 1)]))


def fisher_lower(ours: int, theirs: int, n: int) -> float:
    """One-sided p-value of Fisher's exact test that the candidate's rate (``ours`` of ``n``)
    is below production's (``theirs`` of the same ``n``): P(X <= ours) with X hypergeometric,
    the rows right in all (ours + theirs) drawn n of 2n."""
    right = ours + theirs
    if 2 * n <= EXACT_MAX_ROWS:
        tail = sum(math.comb(right, x) * math.comb(2 * n - right, n - x) for x in range(max(0, right - n), ours + 1))
        return min(1.0, tail / math.comb(2 * n, n))
    total = _log_comb(2 * n, n)
    return min(1.0, _exp_sum([_log_comb(right, x) + _log_comb(2 * n - right, n - x) - total
                              for x in range(max(0, right - n), ours + 1)]))


def _golden_check(e: Evidence, rules: GateConfig) -> GateCheck:
    if e.golden.eval_rows == 0:
        return GateCheck(name="golden", passed=True, numbers={"rows": 0},
                         detail="no golden set to check (no golden_dataset, and no seed, or one too small "
                                "to keep rows of each class back)")
    value = float(getattr(e.golden, e.metric))
    if e.parent_golden is None:
        return GateCheck(name="golden", passed=True, detail=f"first version: {e.metric} {value:.4f} on the golden set",
                         numbers={e.metric: value, "rows": e.golden.eval_rows})
    base = float(getattr(e.parent_golden, e.metric))
    numbers: dict[str, Any] = {e.metric: value, f"production_{e.metric}": base, "margin": rules.golden_margin,
                               "rows": e.golden.eval_rows}
    if value < base - rules.golden_margin - 1e-9:  # a fall of exactly the margin is allowed, whatever the float
        # The margin is a hard bound (a safety gate errs towards keeping production); what
        # the paired rows say of chance is recorded, so that an operator can tell a real
        # regression from a golden set too small to separate the two.
        chance = ""
        if e.golden_candidate and len(e.golden_candidate) == len(e.golden_parent):
            pairs = list(zip(e.golden_candidate, e.golden_parent, strict=True))
            b, c = sum(x and not y for x, y in pairs), sum(y and not x for x, y in pairs)
            p = mcnemar_exact(c, b)  # that production is right more often than the candidate
            numbers.update(candidate_only=b, production_only=c, p_value_worse=p)
            if p >= rules.alpha:
                chance = (f"; chance could explain it (only production right on {c} rows, only the candidate on {b}: "
                          f"McNemar p={p:.3g}): a larger golden set would tell them apart")
        return GateCheck(name="golden", passed=False, numbers=numbers,
                         detail=f"{e.metric} {value:.4f} on the golden set is more than {rules.golden_margin:g} "
                                f"below production's {base:.4f}{chance}")
    drops, by_chance = {}, {}
    classes = [label for label, theirs in e.parent_golden.per_class.items() if theirs.support]
    level = rules.alpha / max(1, len(classes))  # Bonferroni: one false alarm in 1/alpha jobs, whatever the classes
    # Both models answered the same rows: where each row's class is known, a class's drop is
    # tested on its rows, paired (McNemar). Fisher's test for two independent samples, all
    # that per-class recalls alone allow, passed a candidate that lost 7 of a class's 40 rows
    # and gained none (p 0.042 against McNemar's 0.0078, at a level of 0.025).
    paired = bool(e.golden_classes) and len(e.golden_classes) == len(e.golden_candidate) == len(e.golden_parent)
    test = "McNemar's exact test on the class's rows" if paired else "Fisher's exact test"
    for label in classes:
        theirs, ours = e.parent_golden.per_class[label], e.golden.per_class.get(label)
        if ours is None or ours.recall >= theirs.recall - rules.class_recall_margin - 1e-9:
            continue
        if paired:
            rows = [(x, y) for x, y, k in zip(e.golden_candidate, e.golden_parent, e.golden_classes, strict=True)
                    if k == label]
            p = mcnemar_exact(sum(y and not x for x, y in rows), sum(x and not y for x, y in rows))
        else:
            n = theirs.support
            p = fisher_lower(round(ours.recall * n), round(theirs.recall * n), n)
        (drops if p < level else by_chance)[label] = (round(ours.recall, 4), round(theirs.recall, 4))
    numbers.update(recall_drops=drops, recall_drops_by_chance=by_chance, recall_test_level=level)
    if drops:
        worst = ", ".join(f"{k!r} {a:.4f} < {b:.4f}" for k, (a, b) in sorted(drops.items()))  # quoted: label 1 is no number
        return GateCheck(name="golden", passed=False, numbers=numbers,
                         detail=f"recall on the golden set fell by more than {rules.class_recall_margin:g} for {worst} "
                                f"({test}, p < {level:.2g})")
    return GateCheck(name="golden", passed=True, numbers=numbers,
                     detail=f"{e.metric} {value:.4f} on the golden set vs production's {base:.4f} "
                            f"(margin {rules.golden_margin:g}); no class lost recall beyond {rules.class_recall_margin:g}"
                            + (f" but by chance ({len(by_chance)} within {test} at {level:.2g})" if by_chance else ""))


def _fresh_check(e: Evidence, rules: GateConfig) -> GateCheck:
    n = len(e.fresh_candidate)
    if len(e.fresh_parent) != n:
        raise ValueError(f"fresh rows are paired: {n} candidate answers, {len(e.fresh_parent)} production's")
    if e.parent_golden is not None and n == 0 and e.golden.eval_rows == 0:
        # Neither set has a row: a candidate would replace production on no evidence at all.
        return GateCheck(name="fresh", passed=False, numbers={"rows": 0, "golden_rows": 0},
                         detail="no fresh feedback kept back and no golden set: nothing shows the candidate is "
                                "not worse than production (give the model a golden_dataset, or keep "
                                "training.eval_fraction above 0: a job with more feedback keeps rows back)")
    if e.parent_golden is None or n == 0:
        return GateCheck(name="fresh", passed=True, numbers={"rows": n},
                         detail="no fresh feedback to compare on" if n == 0 else "first version: nothing to compare")
    b = sum(1 for c, p in zip(e.fresh_candidate, e.fresh_parent, strict=True) if c and not p)
    c = sum(1 for cc, p in zip(e.fresh_candidate, e.fresh_parent, strict=True) if p and not cc)
    ours, theirs = sum(e.fresh_candidate) / n, sum(e.fresh_parent) / n
    numbers = {"rows": n, "accuracy": ours, "production_accuracy": theirs, "candidate_only": b, "production_only": c}
    # Not right less often than production: the rule at any number of rows. It required a
    # significant win where McNemar's test could show one, so more evidence of a better
    # candidate turned a pass into a rejection (5 rows won against 3 lost was rejected, 2
    # against 2 passed). The test still says whether the win is more than chance.
    passed = b >= c
    tested = ""
    if n >= rules.min_fresh_rows and 0.5 ** (b + c) < rules.alpha:  # k disagreements give p >= 2^-k
        p = mcnemar_exact(b, c)
        numbers.update(p_value=p, alpha=rules.alpha, test="mcnemar_exact_one_sided")
        tested = f", McNemar p={p:.4g} for a win ({'shown' if p < rules.alpha else 'not shown'} at {rules.alpha:g})"
    verdict = ("beats" if b > c else "does not lose to") if passed else "loses to"
    return GateCheck(name="fresh", passed=passed, numbers=numbers,
                     detail=f"{verdict} production on {n} fresh rows: accuracy {ours:.4f} vs {theirs:.4f} "
                            f"({b} right where production was wrong, {c} the other way{tested})")


def _classes(m: EvalMetrics) -> tuple[int, int]:
    """Classes present in the truth, and classes predicted: from the confusion matrix, or
    (multi-label, which has none) each label's counts. A multi-label model whose sigmoids
    all fell under their thresholds answers no label at all: 0 predicted."""
    if m.confusion:
        return sum(1 for row in m.confusion if sum(row)), sum(1 for col in zip(*m.confusion, strict=True) if sum(col))
    if m.per_class and all(c.predicted is not None for c in m.per_class.values()):
        return sum(1 for c in m.per_class.values() if c.support), sum(1 for c in m.per_class.values() if c.predicted)
    return 0, 0


def _sanity_check(e: Evidence) -> GateCheck:
    true_classes, predicted = _classes(e.golden)
    numbers = {"finite": e.finite, "true_classes": true_classes, "predicted_classes": predicted}
    if not e.finite:
        return GateCheck(name="sanity", passed=False, numbers=numbers, detail="the candidate produced non-finite outputs")
    collapsed = true_classes > 1 and predicted <= 1
    answers = "one class" if predicted else "no class"  # multi-label: every sigmoid under its threshold
    if collapsed and e.parent_golden is not None and _classes(e.parent_golden)[1] > 1:
        return GateCheck(name="sanity", passed=False, numbers=numbers,
                         detail=f"the candidate predicts {answers} for a golden set of {true_classes} classes "
                                f"(production predicts {_classes(e.parent_golden)[1]})")
    if collapsed:
        return GateCheck(name="sanity", passed=True, numbers=numbers,
                         detail=f"finite outputs; predicts {answers}, as production does" if e.parent_golden
                         else f"finite outputs; the first version predicts {answers} (nothing to protect)")
    if true_classes == 1:  # a collapse cannot show on rows of one class: not claimed absent
        return GateCheck(name="sanity", passed=True, numbers=numbers,
                         detail="finite outputs; the golden set holds one class, so a collapse to one class "
                                "cannot be seen on it")
    return GateCheck(name="sanity", passed=True, numbers=numbers, detail="finite outputs, no collapse to one class")


def _teacher_check(e: Evidence, t: TeacherEvidence) -> GateCheck:
    ours, theirs = float(getattr(e.golden, e.metric)), float(getattr(t.golden, e.metric))
    numbers = {e.metric: ours, f"teacher_{e.metric}": theirs, "max_gap": t.max_gap, "rows": e.golden.eval_rows,
               "teacher": f"{t.model} {t.version}"}
    if e.golden.eval_rows == 0 or t.golden.eval_rows == 0:
        return GateCheck(name="teacher", passed=True, numbers=numbers,
                         detail=f"no golden set to compare with teacher {t.model} {t.version} on")
    passed = ours >= theirs - t.max_gap - 1e-9  # exactly max_gap below passes, whatever the rounding
    return GateCheck(name="teacher", passed=passed, numbers=numbers,
                     detail=f"{e.metric} {ours:.4f} on the golden set is {'within' if passed else 'more than'} "
                            f"{t.max_gap:g} {'of' if passed else 'below'} teacher {t.model} {t.version}'s {theirs:.4f}")


def decide(evidence: Evidence, rules: GateConfig) -> GateDecision:
    checks = [_golden_check(evidence, rules), _fresh_check(evidence, rules), _sanity_check(evidence)]
    if evidence.teacher is not None:
        checks.insert(2, _teacher_check(evidence, evidence.teacher))
    failed = [c for c in checks if not c.passed]
    reason = "; ".join(c.detail for c in (failed or checks))
    return GateDecision(accepted=not failed, reason=reason, checks=checks)

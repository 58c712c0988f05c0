"""The rollout's decisions (cluster/core/rollout.py): pure, milliseconds."""

import pytest
from pydantic import ValidationError

from tuneloop.core.rollout import (Evidence, Rollout, RolloutConfig, accuracy_difference, canary_bucket, decide,
                                   first_stage)

CFG = RolloutConfig(min_feedback=100, margin=0.02, min_requests=50)


def paired(pairs, production_only, challenger_only, **health):
    """Shadow evidence; the challenger's health seen (``min_requests`` runs) unless given."""
    health = {"challenger_requests": CFG.min_requests, **health}
    return Evidence(paired=True, pairs=pairs, production_only=production_only, challenger_only=challenger_only,
                    **health)


def canary(production, challenger, **health):
    (pn, pa), (cn, ca) = production, challenger
    health = {"challenger_requests": CFG.min_requests, **health}
    return Evidence(paired=False, production_feedback=pn, production_agreed=pa, challenger_feedback=cn,
                    challenger_agreed=ca, **health)


def test_a_better_shadow_advances_a_worse_one_rolls_back():
    assert decide(CFG, paired(200, 5, 30), 60).action == "advance"
    worse = decide(CFG, paired(200, 40, 5), 60)
    assert worse.action == "rollback" and worse.reason.startswith("worse")
    assert worse.numbers["upper"] < 0


def test_identical_answers_advance_on_enough_pairs():
    # A challenger that agrees with production on every request is not worse, once the pairs
    # bound how often it could disagree: 100 agreeing pairs still allow a 3% loss (the rule
    # of three), more than the 2% margin. Wald's interval had no width with no disagreement,
    # and one pair advanced a shadow with min_feedback 1.
    assert decide(CFG, paired(200, 0, 0), 60).action == "advance"
    assert decide(CFG, paired(100, 0, 0), 60).action == "hold"
    assert decide(RolloutConfig(min_feedback=1), paired(1, 0, 0), 60).action == "hold"
    assert decide(RolloutConfig(min_feedback=1), paired(1, 0, 1), 60).action == "hold"


def test_too_little_feedback_holds_and_alerts_only_when_overdue():
    early = decide(CFG, paired(99, 0, 50), 60)
    assert (early.action, early.alert) == ("hold", False) and "99 of 100 pairs" in early.reason
    late = decide(CFG, paired(99, 0, 50), CFG.inconclusive_after_s)
    assert (late.action, late.alert) == ("hold", True)


def test_a_flapping_challenger_is_inconclusive_then_alerts():
    # As many requests it gets right alone as production does: neither bound decides.
    e = paired(200, 30, 30)
    diff, low, high = accuracy_difference(e, CFG.confidence)
    assert diff == 0 and low < -CFG.margin and high > 0
    assert decide(CFG, e, 10).action == "hold" and not decide(CFG, e, 10).alert
    assert decide(CFG, e, 4000).alert


def test_canary_compares_proportions_and_needs_feedback_on_both():
    assert decide(CFG, canary((1000, 900), (100, 97)), 60).action == "advance"
    assert decide(CFG, canary((1000, 900), (120, 80)), 60).action == "rollback"
    assert decide(CFG, canary((1000, 900), (99, 99)), 60).action == "hold"
    assert decide(CFG, canary((50, 45), (500, 450)), 60).action == "hold"  # production's side is short


def test_all_right_or_all_wrong_does_not_break_the_interval():
    _, low, high = accuracy_difference(canary((100, 100), (100, 100)), 0.95)
    assert low < 0 < high  # Agresti-Caffo: a real width at 100%
    assert decide(CFG, canary((200, 0), (200, 200)), 1).action == "advance"


def test_a_decision_says_the_difference_counted_and_bounds_a_difference_can_take():
    """13 of 13 against 0 of 7 was said as +82.2% (the smoothed centre), bounds up to +120.5%."""
    e = canary((7, 0), (13, 13))
    diff, low, high = accuracy_difference(e, 0.95)
    assert -1 <= low < diff < high == 1.0
    advanced = decide(RolloutConfig(min_feedback=2), e, 60)
    assert advanced.action == "advance" and "online accuracy +100.0% vs production" in advanced.reason
    assert advanced.numbers["observed"] == 1.0 and advanced.numbers["upper"] == 1.0
    assert "+100.0%)" in advanced.reason  # the upper bound, clipped
    assert decide(RolloutConfig(min_feedback=2), paired(40, 10, 2), 60).numbers["observed"] == -0.2
    assert "smoothed" not in advanced.reason  # +100% lies within its bounds
    low_confidence = decide(RolloutConfig(min_feedback=2, confidence=0.6, sequential=False), e, 60)
    assert not low_confidence.numbers["lower"] <= 1.0 <= low_confidence.numbers["upper"]
    assert "+100.0% vs production" in low_confidence.reason and "around +82.2% smoothed)" in low_confidence.reason


def test_a_challenger_whose_health_was_not_seen_does_not_advance():
    unseen = decide(CFG, paired(200, 5, 30, challenger_requests=49), 60)
    assert unseen.action == "hold" and "waiting for 50 challenger requests to judge its health: 49" in unseen.reason
    assert decide(CFG, paired(200, 5, 30, challenger_requests=50), 60).action == "advance"
    assert decide(CFG, paired(200, 40, 5, challenger_requests=0), 60).action == "rollback"  # worse needs no health


def test_health_breaches_roll_back_before_any_feedback():
    errors = decide(CFG, paired(0, 0, 0, production_requests=1000, production_errors=1, challenger_requests=100,
                                challenger_errors=5), 1)
    assert errors.action == "rollback" and "error rate 5.00%" in errors.reason
    slow = decide(CFG, paired(0, 0, 0, production_requests=1000, challenger_requests=500,
                              production_p99_s=0.010, challenger_p99_s=0.020), 1)
    assert slow.action == "rollback" and "p99 latency 20.0 ms, 2.00x" in slow.reason
    # Too little to judge: one error in 50 requests (2%, but no evidence of more than 1%), and
    # a p99 of 100 requests (their slowest but one: a cold first batch)
    assert decide(CFG, paired(0, 0, 0, production_requests=1000, challenger_requests=50, challenger_errors=1),
                  1).action == "hold"
    assert decide(CFG, paired(0, 0, 0, production_requests=1000, challenger_requests=100,
                              production_p99_s=0.010, challenger_p99_s=0.020), 1).action == "hold"
    few = decide(CFG, paired(0, 0, 0, production_requests=1000, challenger_requests=49, challenger_errors=49), 1)
    assert few.action == "hold"  # under min_requests: health not judged yet


def test_a_challenger_that_never_loads_is_rolled_back_once_its_loads_failed_three_times():
    def canary(load_failures, waited_s=120, challenger_requests=0, resident=False):
        return decide(CFG, Evidence(paired=False, production_requests=200, challenger_requests=challenger_requests,
                                    challenger_load_failures=load_failures, challenger_resident=resident), waited_s)

    assert canary(2).action == "hold"  # a replica tries again: not yet a verdict
    gone = canary(3)
    assert gone.action == "rollback" and "did not load: 3 failed loads, no replica holds it" in gone.reason
    assert canary(3, waited_s=30).action == "hold"  # three replicas failing once at the start: retries to come
    assert canary(3, challenger_requests=5).action == "hold"  # it loaded somewhere and answers
    assert canary(3, resident=True).action == "hold"  # loaded on a replica, no request routed to it yet


def test_stages_follow_the_mode_and_the_steps():
    steps = [5.0, 25.0, 50.0]
    assert first_stage("shadow", steps) == ("shadow", 0, 0.0)
    assert first_stage("canary", steps) == ("canary", 0, 5.0)
    r = Rollout(version="v2", stage="shadow", started_at="t", stage_started_at="t")
    assert r.next_stage(steps) == ("canary", 0, 5.0)
    r = Rollout(version="v2", stage="canary", step=1, percent=25, started_at="t", stage_started_at="t")
    assert r.next_stage(steps) == ("canary", 2, 50.0)
    assert r.model_copy(update={"step": 2, "percent": 50}).next_stage(steps) is None  # then production


def test_canary_steps_edited_mid_rollout_lead_past_the_share_it_has():
    """At 25% of [5, 25, 50], the next step was read by index in the edited list: [10, 50]
    went straight to production, [30, 40, 60] skipped to 60%, [5, 10, 25, 50] repeated 25%,
    [1, 2, 3] went down to 3%."""
    r = Rollout(version="v2", stage="canary", step=1, percent=25, started_at="t", stage_started_at="t")
    assert r.next_stage([10.0, 50.0]) == ("canary", 1, 50.0)
    assert r.next_stage([30.0, 40.0, 60.0]) == ("canary", 0, 30.0)
    assert r.next_stage([5.0, 10.0, 25.0, 50.0]) == ("canary", 3, 50.0)
    assert r.next_stage([1.0, 2.0, 3.0]) is None  # past every step: production, never a smaller share


@pytest.mark.parametrize("steps", [[5, 5], [50, 25], [0, 10], [10, 100], []])
def test_bad_canary_steps_are_refused_quoting_them(steps):
    with pytest.raises(ValidationError, match="canary_steps"):
        RolloutConfig(canary_steps=steps)


def test_canary_buckets_are_stable_and_spread():
    assert canary_bucket("key-1") == canary_bucket("key-1")
    buckets = [canary_bucket(f"client-{i}") for i in range(4000)]
    assert all(0 <= b < 100 for b in buckets)
    share = sum(b < 25 for b in buckets) / len(buckets)
    assert 0.22 < share < 0.28


def test_quantiles_interpolate_within_a_bucket_as_prometheus_does():
    from tuneloop.core.rollout import VersionHealth, quantile_from_buckets

    buckets = [(0.1, 50.0), (0.2, 100.0), (float("inf"), 100.0)]
    assert quantile_from_buckets(buckets, 0.5) == pytest.approx(0.1)
    assert quantile_from_buckets(buckets, 0.75) == pytest.approx(0.15)
    assert quantile_from_buckets([(0.1, 0.0), (float("inf"), 0.0)], 0.99) is None
    assert quantile_from_buckets([(0.1, 1.0), (float("inf"), 100.0)], 0.99) == 0.1  # past the last bound
    start = VersionHealth(10, 1, ((0.1, 5.0), (float("inf"), 10.0)))
    now = VersionHealth(30, 2, ((0.1, 20.0), (float("inf"), 30.0)))
    assert now.since(start) == VersionHealth(20, 1, ((0.1, 15.0), (float("inf"), 20.0)))


def test_a_clear_loss_rolls_back_before_min_feedback_but_not_before_its_own_minimum():
    assert decide(CFG, paired(29, 20, 0), 1).action == "hold"  # under min_feedback_to_roll_back (30)
    assert decide(CFG, paired(40, 25, 0), 1).action == "rollback"  # 40 < min_feedback (100), yet clear
    assert decide(CFG, paired(40, 0, 25), 1).action == "hold"  # a clear gain still waits for min_feedback


def _looked_at_until_decided(cfg, seed, production_only, challenger_only, looks=100, every=25):
    """One simulated shadow stage: ``every`` pairs between looks (each pair discordant with
    the given chances), the decision at each look, the first that is not hold."""
    import random

    rng, b, c = random.Random(seed), 0, 0
    for look in range(1, looks + 1):
        for _ in range(every):
            u = rng.random()
            b, c = b + (u < production_only), c + (production_only <= u < production_only + challenger_only)
        action = decide(cfg, paired(look * every, b, c), 1).action
        if action != "hold":
            return action
    return "hold"


def test_sequential_bounds_keep_their_confidence_over_a_hundred_looks():
    # 200 stages of up to 2,500 pairs looked at every 25. A challenger 2.5 points worse (past
    # the 2-point margin) must not advance, and an equal one must not be rolled back, more
    # than 5% of the time; a fixed-sample bound tested at each look does both far more often.
    def share(sequential, action, production_only, challenger_only):
        cfg = RolloutConfig(sequential=sequential)
        runs = [_looked_at_until_decided(cfg, s, production_only, challenger_only) for s in range(200)]
        return runs.count(action) / len(runs)

    assert share(True, "advance", 0.065, 0.04) <= 0.05 < 0.10 <= share(False, "advance", 0.065, 0.04)
    assert share(True, "rollback", 0.05, 0.05) <= 0.05 < 0.20 <= share(False, "rollback", 0.05, 0.05)
    assert share(True, "advance", 0.04, 0.05) >= 0.9  # a better one still gets through


def test_the_sequential_bound_is_tightest_near_min_feedback():
    from tuneloop.core.rollout import bound_multiplier

    fixed = bound_multiplier(0.95, 100)
    widths = {n: bound_multiplier(0.95, n, sequential_from=100) for n in (25, 100, 400, 10_000)}
    assert fixed == pytest.approx(1.645, abs=1e-3)
    assert min(widths, key=widths.get) == 100 and 1.8 * fixed < widths[100] < 1.9 * fixed
    assert widths[10_000] < 2.2 * fixed  # grows only as sqrt(log n) past it

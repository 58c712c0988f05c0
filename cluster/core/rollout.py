"""Safe rollout on live traffic: the stages, their settings, and the decision at each look.

A version that passed the offline gate becomes the *challenger* of production:

    shadow (it answers a share of production's requests too, after production's answer
            was sent; its answers are logged, never returned)
      -> canary at each of ``canary_steps`` percent of requests (it answers them)
      -> production                                and back to production alone from any stage

It is judged on the labels users send later, against production on the same footing:

- in **shadow**, paired: both versions answered the very same requests, so the feedback on a
  request scores both; the difference rests on the discordant pairs alone (McNemar's
  statistic, as a Wald interval on the paired difference of proportions);
- in **canary**, the two versions answered different requests of the same period: a
  two-proportion interval (Agresti and Caffo's, which holds at small counts and at 0% or
  100% agreement, where Wald's collapses).

The bounds are a *confidence sequence* by default (``sequential``): valid at every look at
once, however often the controller looks, so a challenger slightly worse than ``margin``
cannot advance at some lucky look over a long stage, as it can when a fixed-sample bound
is tested at each look (peeking). The price is width: at ``min_feedback``, where the
sequence is tightest, the bound is 3.0 standard errors from the difference instead of 1.6
at 95% (``bound_multiplier``), so a close call takes about 3.4 times the feedback.

``decide`` advances when the challenger is *not worse* than production by more than
``margin`` (the lower confidence bound of challenger minus production above ``-margin``,
after ``min_feedback``), rolls back when it is significantly worse (the upper bound below 0,
already after ``min_feedback_to_roll_back``) or unhealthy (error rate or p99 beyond bounds
of production's), and otherwise holds, raising an alert once the
evidence stays inconclusive past ``inconclusive_after_s``. Pure: no Ray, no torch, no I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tuneloop.core.deploy_config import Section

Mode = Literal["direct", "gated", "shadow", "canary"]
Stage = Literal["shadow", "canary"]
Action = Literal["advance", "rollback", "hold"]


class RolloutConfig(Section):
    """``rollout:`` in the config: what happens to a job's version that passed the gate."""

    model_config = ConfigDict(frozen=False)  # its validator fills min_feedback_to_roll_back in

    mode: Mode = Field(default="direct", description=(
        "direct: production at once; gated: waits for an operator (promote, or start its rollout); "
        "shadow: shadow, then the canary steps, then production; canary: the canary steps, then production"))
    shadow_percent: float = Field(default=100.0, gt=0, le=100,
                                  description="share of production's requests the shadow answers too")
    canary_steps: list[float] = Field(default=[5.0, 25.0, 50.0], min_length=1,
                                      description="percent of requests the canary answers, step by step")
    margin: float = Field(default=0.02, ge=0, lt=1,
                          description="how much lower the challenger's online accuracy may be and still advance")
    confidence: float = Field(default=0.95, gt=0.5, lt=1, description="of each one-sided bound")
    sequential: bool = Field(default=True, description=(
        "bounds valid at every look at once (a confidence sequence); false: a fixed-sample bound at each "
        "look, narrower, but repeated looks raise the chance that a slightly worse challenger advances"))
    min_feedback: int = Field(default=100, ge=1, description=(
        "feedback before a stage is judged: pairs in shadow, on each version's answers in canary"))
    min_feedback_to_roll_back: int = Field(default=30, ge=1, description=(
        "feedback before a significant loss rolls back (earlier than min_feedback when it is clear)"))
    min_requests: int = Field(default=50, ge=1,
                              description="challenger requests (or shadow runs) before its health is judged")
    max_error_rate_increase: float = Field(default=0.01, ge=0, le=1,
                                           description="over production's error rate: beyond it, roll back")
    max_latency_ratio: float = Field(default=1.5, ge=1,
                                     description=("challenger p99 request latency over production's, judged once each has 500 "
                                                  "requests: beyond it, roll back"))
    inconclusive_after_s: float = Field(default=3600.0, gt=0,
                                        description="hold this long without a decision, then alert")
    evaluate_every_s: float = Field(default=15.0, gt=0, le=3600, description="how often the controller looks")

    @field_validator("canary_steps")
    @classmethod
    def _increasing_shares(cls, steps: list[float]) -> list[float]:
        if any(not 0 < s < 100 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"canary_steps must be increasing percentages between 0 and 100 (exclusive), got {steps}")
        return steps

    @model_validator(mode="after")
    def _rollback_evidence_comes_first(self) -> RolloutConfig:
        # Past min_feedback a stage is judged in full; a smaller rollback threshold is the point.
        # Left out, it is at most min_feedback: "min_feedback: 20" alone was refused over a key
        # the user never wrote.
        if "min_feedback_to_roll_back" not in self.model_fields_set:
            self.min_feedback_to_roll_back = min(self.min_feedback_to_roll_back, self.min_feedback)
        if self.min_feedback_to_roll_back > self.min_feedback:
            raise ValueError(f"min_feedback_to_roll_back {self.min_feedback_to_roll_back} exceeds min_feedback "
                             f"{self.min_feedback}: a challenger significantly worse in between would hold its "
                             "share instead of rolling back")
        return self


class Rollout(BaseModel):
    """A rollout under way, in the registry's state (store/registry.py), where the replicas
    read it: ``percent`` is the canary's share now (0 in shadow), kept here rather than read
    from the config so that a config edited mid-rollout moves no traffic by itself."""

    version: str
    stage: Stage
    step: int = 0  # index into canary_steps while in canary
    percent: float = 0.0
    started_at: str  # the rollout's start
    stage_started_at: str  # feedback on predictions from here on is this stage's evidence
    paused: bool = False
    alerted: bool = False  # the inconclusive alert was raised for this stage

    def next_stage(self, steps: list[float]) -> tuple[Stage, int, float] | None:
        """Where advancing leads: the first canary step past the share it has now, or None
        (production). By share, not by the step's index: read in ``canary_steps`` edited
        mid-rollout, the index skipped a share ([5, 25, 50] at 25%, edited to [10, 50]:
        straight to production), repeated one or went down."""
        step = 0 if self.stage == "shadow" else next((i for i, s in enumerate(steps) if s > self.percent), len(steps))
        return ("canary", step, steps[step]) if step < len(steps) else None


def first_stage(mode: Mode, steps: list[float]) -> tuple[Stage, int, float]:
    return ("shadow", 0, 0.0) if mode == "shadow" else ("canary", 0, steps[0])


@dataclass(frozen=True)
class Evidence:
    """What one look saw since the stage started. Accuracy: ``pairs`` with ``production_only``
    (production right, challenger wrong) and ``challenger_only`` in shadow; each version's
    feedback and agreements in canary. Health: requests and errors of each version (shadow
    runs for the challenger in shadow) and p99 compute seconds (None: not measured)."""

    paired: bool
    pairs: int = 0
    production_only: int = 0
    challenger_only: int = 0
    production_feedback: int = 0
    production_agreed: int = 0
    challenger_feedback: int = 0
    challenger_agreed: int = 0
    production_requests: int = 0
    production_errors: int = 0
    challenger_requests: int = 0
    challenger_errors: int = 0
    production_p99_s: float | None = None
    challenger_p99_s: float | None = None
    challenger_load_failures: int = 0
    challenger_resident: bool = False

    def samples(self) -> int:
        return self.pairs if self.paired else min(self.production_feedback, self.challenger_feedback)


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    alert: bool = False  # hold, and tell an operator: the evidence stays inconclusive
    numbers: dict = field(default_factory=dict)


def bound_multiplier(confidence: float, n: int, sequential_from: int | None = None) -> float:
    """How many standard errors a one-sided bound at ``confidence`` lies from the estimate,
    after ``n`` samples. Fixed-sample (``sequential_from`` None): the normal quantile.
    Sequential: Robbins's normal-mixture boundary as an asymptotic confidence sequence
    (Waudby-Smith, Arbour, Sinha, Kennedy and Ramdas, 2021, Theorem 2.2), tightest at
    ``sequential_from`` samples: sqrt(2 (x+1)/x log(sqrt(x+1)/alpha)) with x = n rho^2. Its
    alpha covers both sides, so each one-sided bound holds at ``confidence`` or better."""
    if sequential_from is None:
        return NormalDist().inv_cdf(confidence)
    alpha = 1 - confidence
    rho2 = (-2 * math.log(alpha) + math.log(1 - 2 * math.log(alpha))) / sequential_from
    x = max(n, 1) * rho2
    return math.sqrt(2 * (x + 1) / x * math.log(math.sqrt(x + 1) / alpha))


def accuracy_difference(e: Evidence, confidence: float, sequential_from: int | None = None) -> tuple[float, float, float]:
    """Challenger minus production online accuracy, with its one-sided lower and upper
    bounds at ``confidence`` (valid at every look at once with ``sequential_from``, see
    ``bound_multiplier``)."""
    z = bound_multiplier(confidence, e.samples(), sequential_from)
    if e.paired:
        # Agresti and Min's (2005) half a pair added to each cell: Wald's interval on the raw
        # counts has no width when no pair disagrees (b = c = 0), and one concordant pair
        # advanced a shadow with min_feedback 1.
        n, b, c = e.pairs + 2, e.production_only + 0.5, e.challenger_only + 0.5
        diff = (c - b) / n
        se = math.sqrt(max(0.0, (b + c) - (c - b) ** 2 / n)) / n
    else:
        p1 = (e.production_agreed + 1) / (e.production_feedback + 2)
        p2 = (e.challenger_agreed + 1) / (e.challenger_feedback + 2)
        diff = p2 - p1
        se = math.sqrt(p1 * (1 - p1) / (e.production_feedback + 2) + p2 * (1 - p2) / (e.challenger_feedback + 2))
    # A difference of two accuracies lies in [-1, 1]; the normal approximation's tails on a
    # few rows do not (13/13 against 0/7 was bounded at +120.5%). No decision moves: margins are below 1.
    return diff, max(-1.0, diff - z * se), min(1.0, diff + z * se)


def observed_difference(e: Evidence) -> float:
    """Challenger minus production online accuracy as counted, without the smoothing the
    bounds' centre has (13/13 against 0/7 is +100%, where the centre says +82.2%)."""
    if e.paired:
        return _rate(e.challenger_only - e.production_only, e.pairs)
    return _rate(e.challenger_agreed, e.challenger_feedback) - _rate(e.production_agreed, e.production_feedback)


def _rate(errors: int, requests: int) -> float:
    return errors / requests if requests else 0.0


# A challenger no replica holds is rolled back after this many failed loads (summed over the
# replicas), once its stage is LOAD_GIVE_UP_S old: a replica tries again after 10, 20, 40 s
# (version_loader.py), so three replicas failing once at the start are not yet a verdict,
# while one replica has tried four times by then.
LOAD_FAILURES_TO_ROLL_BACK = 3
LOAD_GIVE_UP_S = 90.0

# Requests above the p99 that a p99 is judged on: at 50 requests the p99 was the slowest one,
# and a single cold first batch rolled a canary back.
TAIL_REQUESTS = 5


def error_rate_lower_bound(errors: int, requests: int, z: float) -> float:
    """Wilson's lower bound of an error rate, ``z`` standard errors down: 1 error in 50 is 2%,
    but no evidence of a rate above 1% (its bound at the defaults is 0)."""
    if not requests:
        return 0.0
    p, n = errors / requests, requests
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def health_breach(cfg: RolloutConfig, e: Evidence, waited_s: float) -> str | None:
    """Why the challenger is unhealthy next to production, or None. Its error rate breaches
    when even the rate's lower bound (at ``confidence``, valid at every look with
    ``sequential``) is past production's plus the allowed increase; its p99 latency once
    each side has ``TAIL_REQUESTS`` requests above its p99."""
    if e.challenger_load_failures >= LOAD_FAILURES_TO_ROLL_BACK and not e.challenger_resident \
            and not e.challenger_requests and waited_s >= LOAD_GIVE_UP_S and e.production_requests >= cfg.min_requests:
        # Without this it held, with no request and no feedback, until the alert an hour on,
        # and every new version in the meantime was parked as a candidate.
        return (f"it did not load: {e.challenger_load_failures} failed loads, no replica holds it and it answered "
                f"no request in {waited_s:.0f} s, while production answered {e.production_requests}")
    if e.challenger_requests < cfg.min_requests:
        return None
    mine, theirs = _rate(e.challenger_errors, e.challenger_requests), _rate(e.production_errors, e.production_requests)
    z = bound_multiplier(cfg.confidence, e.challenger_requests, cfg.min_requests if cfg.sequential else None)
    if error_rate_lower_bound(e.challenger_errors, e.challenger_requests, z) > theirs + cfg.max_error_rate_increase:
        return (f"error rate {mine:.2%} over {e.challenger_requests} requests, production's {theirs:.2%} "
                f"(allowed: +{cfg.max_error_rate_increase:.2%})")
    enough = max(cfg.min_requests, round(TAIL_REQUESTS / 0.01))
    if e.challenger_p99_s is not None and e.production_p99_s \
            and min(e.challenger_requests, e.production_requests) >= enough:
        ratio = e.challenger_p99_s / e.production_p99_s
        if ratio > cfg.max_latency_ratio:
            return (f"p99 latency {e.challenger_p99_s * 1000:.1f} ms, {ratio:.2f}x production's "
                    f"{e.production_p99_s * 1000:.1f} ms (allowed: {cfg.max_latency_ratio:g}x)")
    return None


def decide(cfg: RolloutConfig, e: Evidence, waited_s: float) -> Decision:
    """The decision at one look, ``waited_s`` after the stage started."""
    numbers = {k: v for k, v in asdict(e).items() if v is not None}
    breach = health_breach(cfg, e, waited_s)
    if breach:
        return Decision("rollback", f"unhealthy: {breach}", numbers=numbers)
    overdue = waited_s >= cfg.inconclusive_after_s
    n = e.samples()
    what = "pairs" if e.paired else "feedback on each version"
    if n < min(cfg.min_feedback, cfg.min_feedback_to_roll_back):
        return Decision("hold", f"waiting for feedback: {n} of {cfg.min_feedback} {what}", alert=overdue,
                        numbers=numbers)
    diff, low, high = accuracy_difference(e, cfg.confidence, cfg.min_feedback if cfg.sequential else None)
    observed = observed_difference(e)
    numbers |= {"difference": round(diff, 4), "observed": round(observed, 4), "lower": round(low, 4),
                "upper": round(high, 4)}
    kind = "sequential " if cfg.sequential else ""
    # The bounds are centred on the smoothed difference: at a low confidence they are narrow
    # enough to leave out the difference as counted (13 of 13 against 0 of 7, +100%, had fixed
    # 60% bounds +79.1% .. +85.3%), which read as a contradiction unless the centre is said.
    shown = [round(x, 3) for x in (low, observed, high)]  # as the line prints them
    centre = "" if shown[0] <= shown[1] <= shown[2] else f" around {diff:+.1%} smoothed"
    said = (f"online accuracy {observed:+.1%} vs production ({cfg.confidence:.0%} {kind}bounds {low:+.1%} .. "
            f"{high:+.1%}{centre})")
    if n >= cfg.min_feedback and low > -cfg.margin:
        if e.challenger_requests < cfg.min_requests:  # its health not judged yet: never advance unseen
            return Decision("hold", f"not worse so far ({said}), waiting for {cfg.min_requests} challenger "
                                    f"requests to judge its health: {e.challenger_requests}", alert=overdue,
                            numbers=numbers)
        return Decision("advance", f"not worse: {said}, margin {cfg.margin:.1%}", numbers=numbers)
    if n >= cfg.min_feedback_to_roll_back and high < 0:
        return Decision("rollback", f"worse: {said}", numbers=numbers)
    if n < cfg.min_feedback:
        return Decision("hold", f"waiting for feedback: {n} of {cfg.min_feedback} {what} ({said})", alert=overdue,
                        numbers=numbers)
    return Decision("hold", f"inconclusive: {said}", alert=overdue, numbers=numbers)


def canary_bucket(key: str) -> float:
    """Where a client falls in [0, 100): the canary answers it while its bucket is below the
    canary's percent, so a sticky client stays on one version through a step (and, as the
    share grows, moves to the canary once and stays)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64 * 100


def quantile_from_buckets(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of a histogram given as cumulative (upper bound, count) pairs, in
    increasing bounds, interpolated within its bucket as Prometheus's histogram_quantile
    does; None without observations. Past the last finite bound: that bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class VersionHealth:
    """One version's cumulative serving counts, as a replica's metrics have them."""

    requests: float = 0.0
    errors: float = 0.0
    latency_buckets: tuple[tuple[float, float], ...] = ()
    load_failures: float = 0.0
    resident: bool = False  # a replica holds it loaded now (a state, not a count)

    def since(self, start: VersionHealth | None) -> VersionHealth:
        """What happened after ``start`` (a snapshot of the same counters; never below 0: a
        replica's counters that went, with their process's files, are no negative events)."""
        if start is None:
            return self
        before = dict(start.latency_buckets)
        return VersionHealth(max(0.0, self.requests - start.requests), max(0.0, self.errors - start.errors),
                             tuple((le, max(0.0, n - before.get(le, 0.0))) for le, n in self.latency_buckets),
                             max(0.0, self.load_failures - start.load_failures), self.resident)

    def __add__(self, other: VersionHealth) -> VersionHealth:
        buckets = dict(self.latency_buckets)
        for le, n in other.latency_buckets:
            buckets[le] = buckets.get(le, 0.0) + n
        return VersionHealth(self.requests + other.requests, self.errors + other.errors,
                             tuple(sorted(buckets.items())), self.load_failures + other.load_failures,
                             self.resident or other.resident)

    def p99_s(self) -> float | None:
        return quantile_from_buckets(list(self.latency_buckets), 0.99)


NodeHealth = Mapping[str, Mapping[str, VersionHealth]]  # node -> version -> cumulative counts


def health_since(now: NodeHealth, baseline: NodeHealth) -> dict[str, VersionHealth]:
    """Each version's counts since ``baseline``, node by node, then summed. Summed first, a
    node that left (a spot worker) took its history out of the total: 20 errors before the
    stage, gone, made the stage's next 10 errors read as -10 and its error rate negative.
    A node new since the baseline counts from 0; one gone since is not counted."""
    out: dict[str, VersionHealth] = {}
    for node, versions in now.items():
        before = baseline.get(node, {})
        for version, health in versions.items():
            out[version] = out.get(version, VersionHealth()) + health.since(before.get(version))
    return out

"""Safe rollout: what shadowing costs production's answers, and how long decisions take.

One command, one run, ratios against baselines measured in that same run:

    .venv/bin/python benchmarks/rollout_bench.py            # all-MiniLM-L6-v2, several minutes
    .venv/bin/python benchmarks/rollout_bench.py --smoke    # tiny random model: checks the tables

1. **Shadow cost**: production's p50/p99 at half of its peak load (open loop, Poisson
   arrivals), without a rollout and with a shadow answering every request too (the rollout
   paused, so nothing moves). Target: p99 at most 5% above the baseline.
2. **Decision time** at a given feedback rate: a challenger the feedback favours, from the
   start of its rollout (shadow, then each canary step) to production; and a worse canary, to
   its automatic rollback. The baseline is the least time the policy could take at that rate:
   the feedback each stage needs (``min_feedback``, on the challenger's share in canary)
   divided by the rate.

v2 is v1's weights with a classifier bias towards "positive", so the two disagree on a share
of texts; feedback says "positive" (the challenger is better) or takes production's side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve_bench import (LABELS as TASK_LABELS, _closed_loop, _open_loop, _session, build_tiny,  # noqa: E402
                                    prepare_model, short_texts, start_serve)

TASK = "text-classification"
LABELS = TASK_LABELS[TASK]


def biased_copy(model_dir: str, out: Path, bias: float = 5.0) -> str:
    """``model_dir`` with its classifier's bias pushed towards the last label."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    with torch.no_grad():
        head = model.classifier if hasattr(model, "classifier") else model.score
        head.bias[-1] += bias
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return str(out)


def shadow_runs(base: str) -> dict[str, float]:
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith("tuneloop_shadow_runs_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            out[outcome] = out.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def drive_feedback(base: str, texts: list[str], rate: float, judge, done, timeout_s: float,
                         on_state) -> tuple[float, int, int]:
    """Predict and send feedback at ``rate`` per second (each with ``judge``'s label) until
    ``done(state)``; returns the seconds it took, the feedback stored (202) and the attempts
    that failed (a predict or feedback error, or feedback not stored). ``on_state`` hears
    every state polled."""
    start = time.perf_counter()
    rng = random.Random(2)
    stored = failed = 0
    async with _session(256) as session:

        async def one(text: str) -> None:
            nonlocal stored, failed
            try:
                async with session.post(f"{base}/v1/models/bench/predict", json={"inputs": [text]}) as r:
                    answer = (await r.json())["predictions"][0]
                async with session.post(f"{base}/v1/feedback",
                                        json={"prediction_id": answer["id"], "label": judge(answer)}) as r:
                    await r.read()
                    stored += r.status == 202
                    failed += r.status != 202
            except (aiohttp.ClientError, KeyError, TimeoutError):
                failed += 1

        tasks: list[asyncio.Task] = []
        next_at, last_poll = time.perf_counter(), 0.0
        while True:
            now = time.perf_counter()
            if now - last_poll > 1.0:
                last_poll = now
                async with session.get(f"{base}/v1/models/bench") as r:
                    state = await r.json()
                on_state(now - start, state)
                if done(state):
                    break
                if now - start > timeout_s:
                    raise TimeoutError(f"no decision within {timeout_s:.0f}s: {state}")
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(rng.choice(texts))))
            next_at += rng.expovariate(rate)
        for t in tasks:
            t.cancel()
    return time.perf_counter() - start, stored, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per latency cell")
    ap.add_argument("--feedback-rate", type=float, default=20.0, help="feedback records per second")
    ap.add_argument("--min-feedback", type=int, default=100, help="rollout.min_feedback")
    ap.add_argument("--steps", default="5,25,50", help="rollout.canary_steps")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the replica")
    ap.add_argument("--parts", default="shadow,decisions", help="which parts to run")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, short cells: checks the tables only")
    args = ap.parse_args()
    if args.smoke:
        args.seconds, args.min_feedback, args.steps = 3.0, 20, "50"

    import ray
    from ray import serve

    from tests.integration.conftest import publish_version
    from tuneloop.control.apps import deploy
    from tuneloop.control.server import wait_ready
    from tuneloop.core.config import parse_config
    from tuneloop.serving.app import undeploy
    from tuneloop.store.registry import Registry
    from tuneloop.store.storage import Storage

    work = Path(tempfile.mkdtemp(prefix="tuneloop-rollout-bench-"))
    model_dir = build_tiny(work, TASK) if args.smoke else prepare_model(args.model, work, TASK)
    challenger_dir = biased_copy(model_dir, work / "biased")
    steps = [float(s) for s in args.steps.split(",")]
    cfg = parse_config({
        "models": [{"name": "bench", "base_model": model_dir, "labels": LABELS}],
        "storage": {"root": str(work / "store")},
        "serving": {"max_batch_size": 32, "num_cpus_per_replica": args.threads, "max_length": 128,
                    "reload_interval_s": 0.5},
        # Open roles share one rate-limit bucket: lift it, or it caps feedback at 2/s.
        "auth": {"open_roles": ["predict", "feedback"], "feedback_per_minute": 600_000, "feedback_burst": 10_000},
        "feedback": {"compact_interval_s": 1.0},
        # Health is not what this measures: judged from a few requests on, with bounds no
        # healthy challenger reaches (a challenger advances only once its health was judged).
        "rollout": {"min_feedback": args.min_feedback, "canary_steps": steps, "evaluate_every_s": 2,
                    "min_requests": 10, "max_error_rate_increase": 1.0, "max_latency_ratio": 1000.0},
    })
    publish_version(cfg, model_dir)
    publish_version(cfg, challenger_dir, promote=False)  # v2
    registry = Registry(Storage(cfg.storage.root))
    texts = short_texts(2000, random.Random(0))
    print(f"model: {'tiny random BERT (smoke)' if args.smoke else args.model}; cores: {os.cpu_count()}; "
          f"feedback rate {args.feedback_rate:g}/s; min_feedback {args.min_feedback}; canary steps {steps}",
          flush=True)

    metrics_dir, base = start_serve(work, args.threads)
    url = f"{base}/v1/models/bench/predict"
    try:
        deploy(cfg, metrics_dir)
        wait_ready(base, timeout_s=300)
        parts = set(args.parts.split(","))
        if "shadow" in parts:
            shadow_cost(base, url, registry, texts, args.seconds)
        if "decisions" in parts:
            decision_times(base, registry, texts, args, steps, cfg.rollout.min_feedback_to_roll_back)
        undeploy(cfg)
    finally:
        serve.shutdown()
        ray.shutdown()


def _one(text: str) -> dict:
    return {"inputs": [text]}


def shadow_cost(base: str, url: str, registry, texts: list[str], seconds: float) -> None:
    """Part 1: production's latency at half of its peak, alone and with a shadow."""
    peak = asyncio.run(_closed_loop(url, _one, texts, 16, seconds, 2.0)).throughput
    rate = peak / 2
    baseline = asyncio.run(_open_loop(url, _one, texts, rate, seconds, 2.0))
    registry.start_rollout("bench", "v2", "shadow", 0, "benchmark")
    registry.mark_rollout("bench", "v2", "pause", "benchmark: measure only")
    deadline = time.monotonic() + 120
    while not shadow_runs(base).get("ok"):
        assert time.monotonic() < deadline, "the shadow never ran"
        asyncio.run(_open_loop(url, _one, texts, 2.0, 1.0, 0.0))
    before = shadow_runs(base)
    shadowed = asyncio.run(_open_loop(url, _one, texts, rate, seconds, 2.0))
    after = shadow_runs(base)
    registry.abort_rollout("bench", "v2", "benchmark")
    time.sleep(3)  # the replicas see the rollout end (reload_interval_s 0.5 here) before the second baseline
    # Alone again after it: the shadow is rated against the mean of the two runs beside it
    # (this machine drifts more than the 5% target between two runs minutes apart).
    again = asyncio.run(_open_loop(url, _one, texts, rate, seconds, 2.0))
    ran, shed = (after.get(k, 0) - before.get(k, 0) for k in ("ok", "shed"))
    p50, p99 = (baseline.p50 + again.p50) / 2, (baseline.p99 + again.p99) / 2
    print(f"\n1. Shadow cost at half of peak ({rate:.1f} requests/s; peak {peak:.1f}/s, 16 clients)\n")
    print("| | p50 ms | p99 ms | errors | p50 ratio | p99 ratio |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in (("production alone, before", baseline), ("with a shadow", shadowed),
                    ("production alone, after", again)):
        print(f"| {name} | {r.p50 * 1e3:.1f} | {r.p99 * 1e3:.1f} | {r.errors} | {r.p50 / p50:.2f} | "
              f"{r.p99 / p99:.2f} |")
    print("\nratios: to the mean of the two runs alone, before and after the shadow's.")
    print(f"\nshadow runs: {ran:.0f} ran, {shed:.0f} shed ({ran / max(1.0, ran + shed):.0%} of requests shadowed)",
          flush=True)


def decision_times(base: str, registry, texts: list[str], args, steps: list[float], to_roll_back: int) -> None:
    """Part 2: a better challenger from its start to production, a worse canary to rollback."""
    stages: list[tuple[float, str]] = []

    def note(t: float, state: dict) -> None:
        r = state.get("rollout")
        where = "production" if state["production"] == "v2" else (
            f"{r['stage']} {r['percent']:g}%" if r else "rolled back")
        if not stages or stages[-1][1] != where:
            stages.append((t, where))

    def row(name: str, run: tuple[float, int, int], needed: float) -> None:
        """``needed``: the feedback on the whole traffic the decision needs; the least
        possible time is that at the rate feedback was actually stored (lost feedback is
        the load's, not the rollout policy's)."""
        took, stored, failed = run
        bound = needed / max(stored / took, 1e-9)
        print(f"| {name} | {', '.join(f'{w} {t:.0f}' for t, w in stages)} | {stored} | {failed} | {took:.0f} | "
              f"{bound:.0f} | {took / bound:.2f} |", flush=True)

    registry.promote("bench", "v1")  # a fresh start: v1 production, v2 the challenger
    registry.start_rollout("bench", "v2", "shadow", 0, "benchmark: better challenger")
    print(f"\n2. Decision time at {args.feedback_rate:g} feedback/s\n")
    print("| rollout | stages reached (s from start) | feedback stored | failed | took s | least possible s | ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    run = asyncio.run(drive_feedback(base, texts, args.feedback_rate, lambda a: "positive",
                                     lambda s: s["production"] == "v2", 3600, note))
    rate = args.feedback_rate
    row("better challenger, shadow to production", run,
        args.min_feedback + sum(args.min_feedback / (p / 100) for p in steps))
    registry.rollback("bench")  # v1 production again
    stages.clear()
    registry.start_rollout("bench", "v2", "canary", steps[0], "benchmark: worse canary")
    run = asyncio.run(drive_feedback(
        base, texts, rate, lambda a: a["label"] if a["version"] == "v1" else LABELS[1 - LABELS.index(a["label"])],
        lambda s: s["rollout"] is None, 3600, note))
    row(f"worse canary at {steps[0]:g}%, to rollback", run, min(args.min_feedback, to_roll_back) / (steps[0] / 100))
    print("\nLeast possible: the feedback a decision needs (min_feedback to advance, min_feedback_to_roll_back "
          "to roll back), on the challenger's share, at the rate feedback was stored (failed: predict or feedback "
          "calls that did not end in a stored record); the rest is the evaluation interval "
          "(2 s here), the log flush before feedback can join a prediction, compaction, and, near a tie, the "
          "extra feedback the bound needs.")


if __name__ == "__main__":
    main()

"""Adapting to a new domain from feedback: tuneloop's replay policy against training on
everything (the old behaviour) and fine-tuning on the new labels only, measured in the same
run from the same v1, on real data.

    .venv/bin/python benchmarks/adapt_bench.py [--data ../shared/data] [--seed-rows 2000]
        [--rounds 3] [--round-size 150] [--poison-rows 200] [--epochs 3] [--eval-rows 800] [--keep]

v1 is all-MiniLM-L6-v2 fine-tuned on ``--seed-rows`` SST-2 movie-review sentences. It is
trained once, in the ``replay`` storage root, and that root is then copied into the other
two, so all three strategies start from the same weights, the same frozen golden set and
the same job history; they differ only in the ``training`` keys a user would change:

- ``replay``: tuneloop's default (replay_ratio 1.0: one seed/earlier row per fresh row);
- ``everything``: every earlier row in every job (a replay_ratio far above what the pool
  holds, so the whole pool is taken);
- ``new-only``: replay_ratio 0, the new labels alone (it forgets SST-2).

Then ``--rounds`` rounds of ``--round-size`` airline-tweet labels (negative/positive, in
tweet time order) arrive as feedback; after each, every strategy retrains through
``run_training`` (Ray Train + DeepSpeed, the gate, the registry) and its production model
is scored on the airline test set and on SST-2 dev (each capped at ``--eval-rows`` rows, a
fixed sample). Feedback is given on predictions, as users of the API give it: each label
comes with what production predicted for the text (its prediction id, version and label).
Last, a poisoned round: the next ``--poison-rows`` airline labels, flipped, all from one API
key, for ``replay``, ``everything``, and ``replay`` with quarantine off (``golden-only``: the
gate alone against the flipped round). Target: no flipped label reaches production (with
quarantine on, a version trained on the honest rows only may well be promoted).

Prints markdown tables (accuracy, change against v1 in points, job seconds and their ratio
to ``everything`` in the same round) and whether the issue's targets were met; progress
goes to stderr. Starts its own local Ray (6 logical CPUs, as the integration tests do).
Reproducible: fixed samples and training.seed 0. Slow on a CPU: ten trainings of a few
thousand rows, several minutes each.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from tuneloop.core.config import TuneloopConfig, parse_config  # noqa: E402
from tuneloop.core.model_source import resolve_model_source  # noqa: E402
from tuneloop.core.tasks import model_tasks  # noqa: E402
from tuneloop.store.feedback_store import FeedbackStore  # noqa: E402
from tuneloop.store.records import new_prediction_id
from tuneloop.store.registry import Registry  # noqa: E402
from tuneloop.store.storage import Storage  # noqa: E402
from tuneloop.training.launcher import TrainingOutcome, run_training  # noqa: E402

MODEL = "sentiment"
LABELS = ["negative", "positive"]
BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
RAY_NUM_CPUS = 6  # as tests/integration/conftest.py: more than the 2 workers, or Ray Data starves
USER_KEY, POISON_KEY = "0a1b2c3d", "deadbeef"
GOLDEN_ONLY = "golden-only"  # replay's history and keys, quarantine off: the gate alone
FLIP = {"negative": "positive", "positive": "negative"}
STRATEGIES = {  # what differs between them: only these training keys
    "replay": {"replay_ratio": 1.0},
    "everything": {"replay_ratio": 10**9, "max_rows_per_job": 10**7, "reservoir_size": 10**7},
    "new-only": {"replay_ratio": 0.0},
}
_started = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


def read_tsv(path: Path) -> list[dict[str, str]]:
    # The files are tab-separated without quoting (README): a plain split, not csv's quotes.
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        return [dict(zip(header, line.rstrip("\r\n").split("\t"))) for line in f if line.strip()]


def sample(rows: list, cap: int, seed: int) -> list:
    """At most ``cap`` of ``rows``, the same ones every run, in their order."""
    return rows if len(rows) <= cap else [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), cap))]


def make_config(root: Path, seed_file: Path, base_model: str, epochs: int, quarantine: bool = True,
                **training) -> TuneloopConfig:
    return parse_config({
        "quarantine": {"enabled": quarantine},
        "models": [{"name": MODEL, "base_model": base_model, "labels": LABELS, "seed_dataset": str(seed_file)}],
        "storage": {"root": str(root)},
        "auth": {"create_admin_key": False},
        "training": {"epochs": epochs, "num_workers": 2, "batch_size": 16, "max_length": 64,
                     "eval_fraction": 0.2, "seed": 0, **training},
    })


def add_feedback(cfg: TuneloopConfig, rows: list[tuple[str, str]], key_id: str) -> None:
    """As the ingress would store feedback on predictions: each label with what production
    predicted for its text, journalled, then compacted into Parquet."""
    registry = Registry(Storage(cfg.storage.root))
    version = registry.production(MODEL)
    tokenizer, net = _load(registry.local_path(MODEL, version))
    predicted = predict(tokenizer, net, [t for t, _ in rows], cfg.serving.max_length)
    store = FeedbackStore(Storage(cfg.storage.root), cfg.storage.journal_path(), model_tasks(cfg.models))
    store.open_writer()
    try:
        for (text, label), served in zip(rows, predicted, strict=True):
            store.append(model=MODEL, text=text, label=label, key_id=key_id, prediction_id=new_prediction_id(),
                         version=version, predicted_label=served)
        store.compact()
    finally:
        store.close()


def train(cfg: TuneloopConfig) -> tuple[TrainingOutcome, float]:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Ray Train's reports must not mix into the tables
        outcome = run_training(cfg, MODEL, trigger="benchmark")
    return outcome, time.perf_counter() - t0


_scores: dict[str, tuple[float, float]] = {}
_models: dict[str, tuple] = {}


def _load(path: str) -> tuple:
    if path not in _models:
        _models.clear()  # one model in memory at a time
        _models[path] = (AutoTokenizer.from_pretrained(path),
                         AutoModelForSequenceClassification.from_pretrained(path).eval())
    return _models[path]


def score(cfg: TuneloopConfig, airline: list[tuple[str, str]], sst2: list[tuple[str, str]]) -> tuple[float, float]:
    """Accuracy of production on (airline test, SST-2 dev), as it would be served."""
    registry = Registry(Storage(cfg.storage.root))
    path = registry.local_path(MODEL, registry.production(MODEL))
    if path not in _scores:  # a rejected job leaves production as it was: no need to score again
        tokenizer, net = _load(path)
        _scores[path] = tuple(accuracy(tokenizer, net, rows, cfg.serving.max_length) for rows in (airline, sst2))
    return _scores[path]


def predict(tokenizer, net, texts: list[str], max_length: int) -> list[str]:
    id2label = net.config.id2label  # the checkpoint's own label order, not an assumed one
    out: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(texts), 64):
            enc = tokenizer(texts[i:i + 64], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            out.extend(id2label[p] for p in net(**enc).logits.argmax(-1).tolist())
    return out


def accuracy(tokenizer, net, rows: list[tuple[str, str]], max_length: int) -> float:
    predicted = predict(tokenizer, net, [t for t, _ in rows], max_length)
    return sum(p == label for p, (_, label) in zip(predicted, rows, strict=True)) / len(rows)


@dataclass
class Result:
    round: str
    labels: int  # airline labels given so far
    strategy: str
    outcome: TrainingOutcome | None
    seconds: float
    airline: float
    sst2: float
    poisoned: bool = False  # production trained on a flipped label


def poison_in_production(cfg: TuneloopConfig) -> bool:
    """Whether the production version trained on any row from the poisoning key."""
    registry = Registry(Storage(cfg.storage.root))
    trained_on = registry.table(MODEL, registry.production(MODEL), "trained_on")
    return trained_on is not None and POISON_KEY in trained_on.column("key_id").to_pylist()


def job_cell(outcome: TrainingOutcome | None) -> str:
    if outcome is None:
        return "seed"
    job, manifest = outcome.job, outcome.manifest
    if manifest is None:
        return f"failed: {(job.error or '')[:60]}"
    return f"{manifest.version} {'promoted' if job.promoted else manifest.status}"


def pts(value: float, v1: float) -> str:
    return f"{(value - v1) * 100:+.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--seed-rows", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round-size", type=int, default=150)
    ap.add_argument("--poison-rows", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--eval-rows", type=int, default=800, help="cap on each evaluation set (a fixed sample)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary storage roots")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the driver's tokenizer beside Ray's forks
    # Beside the default storage (./.tuneloop), on the disk it would use, as the other benchmarks.
    work = Path(tempfile.mkdtemp(prefix=".adapt-bench-", dir=ROOT))
    try:
        run(args, work)
    finally:
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    data = Path(args.data)
    # Seed: SST-2 train, a fixed sample, labels as the model's names.
    sst_names = {"0": "negative", "1": "positive"}
    seed = sample(read_tsv(data / "sst2/train.tsv"), args.seed_rows, seed=0)
    seed_file = work / "seed.tsv"
    seed_file.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{sst_names[r['label']]}\n" for r in seed),
                         encoding="utf-8")
    sst2_dev = sample([(r["text"], sst_names[r["label"]]) for r in read_tsv(data / "sst2/dev.tsv")],
                      args.eval_rows, seed=1)
    # Airline tweets, binary; training labels replayed in the order the tweets were written.
    tweets = [r for r in read_tsv(data / "airline_tweets/train.tsv") if r["label"] != "neutral"]
    tweets.sort(key=lambda r: datetime.strptime(r["created"], "%d-%m-%Y %H.%M"))  # stable: ties keep file order
    stream = [(r["text"], r["label"]) for r in tweets]
    airline_test = sample([(r["text"], r["label"]) for r in read_tsv(data / "airline_tweets/test.tsv")
                           if r["label"] != "neutral"], args.eval_rows, seed=2)
    needed = args.rounds * args.round_size + args.poison_rows
    if len(stream) < needed:
        raise SystemExit(f"{len(stream)} binary airline training rows; the rounds need {needed}")
    progress(f"seed {len(seed)} SST-2 rows; evaluating on {len(airline_test)} airline test, "
             f"{len(sst2_dev)} SST-2 dev rows")

    ray.init(num_cpus=RAY_NUM_CPUS, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        base_model = resolve_model_source(BASE_MODEL)
        cfgs = {name: make_config(work / name, seed_file, base_model, args.epochs, **keys)
                for name, keys in STRATEGIES.items()}

        progress("v1: training on the SST-2 seed (once, in the replay root)…")
        first, v1_seconds = train(cfgs["replay"])
        if first.job.state != "succeeded":
            raise SystemExit(f"v1 did not train: {first.job.error or first.job.message}")
        for name in ("everything", "new-only"):  # the same v1, golden set and history for all
            shutil.copytree(work / "replay", work / name, ignore=shutil.ignore_patterns("train_runs"))
        v1_airline, v1_sst2 = score(cfgs["replay"], airline_test, sst2_dev)
        progress(f"v1 ({v1_seconds:.0f} s): airline {v1_airline:.3f}, SST-2 dev {v1_sst2:.3f}")
        results = [Result("v1", 0, "all", None, v1_seconds, v1_airline, v1_sst2)]

        for r in range(1, args.rounds + 1):
            batch = stream[(r - 1) * args.round_size: r * args.round_size]
            for name, cfg in cfgs.items():
                add_feedback(cfg, batch, USER_KEY)
                progress(f"round {r}/{args.rounds} {name}: training ({len(batch)} fresh rows)…")
                outcome, seconds = train(cfg)
                airline, sst2 = score(cfg, airline_test, sst2_dev)
                results.append(Result(str(r), r * args.round_size, name, outcome, seconds, airline, sst2))
                progress(f"round {r}/{args.rounds} {name}: {job_cell(outcome)} in {seconds:.0f} s; "
                         f"airline {airline:.3f}, SST-2 dev {sst2:.3f}")

        # Poison: the next labels in time order, every one flipped, from one key; and the
        # same against the gate alone (replay's history, quarantine off).
        start = args.rounds * args.round_size
        flipped = [(text, FLIP[label]) for text, label in stream[start:start + args.poison_rows]]
        shutil.copytree(work / "replay", work / GOLDEN_ONLY, ignore=shutil.ignore_patterns("train_runs"))
        cfgs[GOLDEN_ONLY] = make_config(work / GOLDEN_ONLY, seed_file, base_model, args.epochs, quarantine=False,
                                        **STRATEGIES["replay"])
        poisoned = []
        for name in ("replay", "everything", GOLDEN_ONLY):
            add_feedback(cfgs[name], flipped, POISON_KEY)
            progress(f"poison {name}: training ({len(flipped)} flipped rows from key {POISON_KEY})…")
            outcome, seconds = train(cfgs[name])
            airline, sst2 = score(cfgs[name], airline_test, sst2_dev)
            poisoned.append(Result("poison", start + len(flipped), name, outcome, seconds, airline, sst2,
                                   poison_in_production(cfgs[name])))
            progress(f"poison {name}: {job_cell(outcome)} in {seconds:.0f} s")
    finally:
        ray.shutdown()
    report(results, poisoned, v1_airline, v1_sst2)


def report(results: list[Result], poisoned: list[Result], v1_airline: float, v1_sst2: float) -> None:
    everything = {r.round: r.seconds for r in results if r.strategy == "everything"}
    print("## Adapting to airline tweets\n")
    print("| round | labels | strategy | job | train rows | airline test | Δ v1 (pts) | SST-2 dev | Δ v1 (pts) "
          "| job s | × everything |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        manifest = r.outcome.manifest if r.outcome else None
        rows = manifest.data.get("train_rows", "") if manifest else ""
        ratio = f"{r.seconds / everything[r.round]:.2f}" if r.round in everything else ""
        print(f"| {r.round} | {r.labels} | {r.strategy} | {job_cell(r.outcome)} | {rows} | {r.airline:.3f} "
              f"| {pts(r.airline, v1_airline)} | {r.sst2:.3f} | {pts(r.sst2, v1_sst2)} | {r.seconds:.0f} | {ratio} |")

    print("\n## Flipped labels from one key\n")
    print("| strategy | job | flipped labels in production | quarantine | gate | airline test | Δ v1 (pts) "
          "| SST-2 dev | Δ v1 (pts) | job s |")
    print("| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in poisoned:
        manifest = r.outcome.manifest
        reason = manifest.gate.reason if manifest and manifest.gate else (r.outcome.job.error or "")
        held = manifest.data.get("quarantine", {}) if manifest else {}
        quarantine = (f"{', '.join(held['flagged'])} held ({held['held_rows']} rows): "
                      + "; ".join(held["flagged"].values())) if held.get("flagged") else "no key flagged"
        print(f"| {r.strategy} | {job_cell(r.outcome)} | {'YES' if r.poisoned else 'no'} "
              f"| {quarantine.replace('|', '/')} | {reason.replace('|', '/')} "
              f"| {r.airline:.3f} | {pts(r.airline, v1_airline)} | {r.sst2:.3f} | {pts(r.sst2, v1_sst2)} "
              f"| {r.seconds:.0f} |")

    # The targets, for the default policy.
    replay = [r for r in results if r.strategy == "replay"]
    within = [r for r in replay if r.labels <= 400]
    gain = max((r.airline - v1_airline) * 100 for r in within) if within else None
    drop = max((v1_sst2 - r.sst2) * 100 for r in replay) if replay else None
    def kept_out(strategy: str) -> tuple[TrainingOutcome, bool]:
        r = next(r for r in poisoned if r.strategy == strategy)
        return r.outcome, r.outcome.manifest is not None and not r.poisoned  # a failed job kept out nothing

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print("\n## Targets (replay)\n")
    print("- airline gain ≥ 5 points over v1 within 400 labels: "
          + (f"{gain:+.1f} points, {verdict(gain >= 5)}" if gain is not None else "no round within 400 labels"))
    print("- SST-2 dev drop ≤ 1 point (worst round): "
          + (f"{drop:.1f} points, {verdict(drop <= 1)}" if drop is not None else "no rounds"))
    for strategy in ("replay", GOLDEN_ONLY):
        outcome, ok = kept_out(strategy)
        print(f"- no flipped label reaches production ({strategy}): {job_cell(outcome)}, {verdict(ok)}")


if __name__ == "__main__":
    main()

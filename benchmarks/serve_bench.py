"""Serving throughput and latency: the bare model, tuneloop, and a naive Ray Serve baseline.

One command, one run, ratios against baselines measured in that same run:

    .venv/bin/python benchmarks/serve_bench.py              # full run (minutes)
    .venv/bin/python benchmarks/serve_bench.py --smoke      # tiny model, seconds: checks the table

1. bare: batched forward passes in a plain Python loop (same model, texts and thread count
   as a serving replica) -- the hardware limit for this model here;
2. tuneloop: the real Serve app over HTTP, one text per request;
3. naive: Ray Serve + a transformers pipeline, one forward pass per request, no batching.

Each server is driven by a closed-loop generator on loopback (C clients, each sending its
next request when the last one returns) at several concurrency levels. Texts are SST-2
sentences from ../shared/data/sst2 when present, generated otherwise ("short"), and
passages of at least 200 tokens ("long").
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.fast_path import enable_fast_path, free_port  # noqa: E402

enable_fast_path(private_haproxy_ports=True)  # before ray is imported

SST2 = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
LABELS = ["negative", "positive"]


# -- texts ------------------------------------------------------------------------------
def short_texts(n: int, rng: random.Random) -> list[str]:
    if SST2.exists():
        lines = SST2.read_text().splitlines()[1:]
        texts = [line.split("\t")[0].strip() for line in lines if line.strip()]
        return [rng.choice(texts) for _ in range(n)]
    words = ("the film was a quiet delight with sharp writing and warm performances but the "
             "ending dragged on far too long for its own good").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 30))) for _ in range(n)]


def long_texts(n: int, rng: random.Random, tokenizer, min_tokens: int = 200) -> list[str]:
    pool = short_texts(400, rng)
    out = []
    for _ in range(n):
        parts: list[str] = []
        while len(tokenizer(" ".join(parts))["input_ids"]) < min_tokens:
            parts.append(rng.choice(pool))
        out.append(" ".join(parts))
    return out


# -- the model under test ---------------------------------------------------------------
def prepare_model(source: str, workdir: Path) -> str:
    """A sequence-classification checkpoint of ``source`` (a fresh head if it has none)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cluster.model_source import resolve_model_source

    path = resolve_model_source(source)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={x: i for i, x in enumerate(LABELS)}
    )
    out = workdir / "model"
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(path).save_pretrained(str(out))
    return str(out)


def build_tiny(workdir: Path) -> str:
    from tests.integration.conftest import build_tiny_model

    return build_tiny_model(workdir / "model", LABELS)


# -- 1. bare model ----------------------------------------------------------------------
def bare_throughput(model_dir: str, texts: list[str], batch_size: int, threads: int, max_length: int,
                    seconds: float) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()

    def run(batch):
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            model(**enc).logits.softmax(-1)

    run(texts[:batch_size])  # warm-up
    done, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = [texts[(i + k) % len(texts)] for k in range(batch_size)]
        run(batch)
        done += len(batch)
        i += batch_size
    return done / (time.perf_counter() - start)


# -- load generator ---------------------------------------------------------------------
@dataclass
class LoadResult:
    throughput: float
    p50: float
    p95: float
    p99: float
    errors: int


async def _closed_loop(url: str, body_of, texts: list[str], concurrency: int, seconds: float, warmup: float) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + warmup + seconds
    measure_from = time.perf_counter() + warmup
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def worker(k: int):
            nonlocal errors
            i = k
            while time.perf_counter() < stop_at:
                text = texts[i % len(texts)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, json=body_of(text))
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                t1 = time.perf_counter()
                if t0 >= measure_from:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors += 1

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    lat = sorted(latencies) or [math.nan]

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))]

    return LoadResult(len(latencies) / seconds, pct(0.5), pct(0.95), pct(0.99), errors)


def drive(url: str, body_of, texts: list[str], concurrency: int, seconds: float, warmup: float) -> LoadResult:
    return asyncio.run(_closed_loop(url, body_of, texts, concurrency, seconds, warmup))


def batch_stats(base_url: str) -> tuple[float, float]:
    """(sum, count) of tuneloop_batch_size across versions, from /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    total = sum(float(v) for v in re.findall(r'^tuneloop_batch_size_sum\{[^}]*\} (\S+)$', text, re.M))
    count = sum(float(v) for v in re.findall(r'^tuneloop_batch_size_count\{[^}]*\} (\S+)$', text, re.M))
    return total, count


# -- 3. the naive baseline --------------------------------------------------------------
def naive_app(model_dir: str, threads: int, max_length: int):
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(ray_actor_options={"num_cpus": threads}, max_ongoing_requests=1000)
    class NaivePipeline:
        def __init__(self, path: str):
            import torch
            from transformers import pipeline

            torch.set_num_threads(threads)
            self.pipe = pipeline("text-classification", model=path, tokenizer=path, device="cpu")

        async def __call__(self, request: Request):
            body = await request.json()
            return self.pipe(body["inputs"][0], truncation=True, max_length=max_length)

    return NaivePipeline.bind(model_dir)


def cfg_target(args) -> str:
    from cluster.config import ServingConfig

    return f"{args.target_batch_latency or ServingConfig().target_batch_latency_s:g}s"


# -- main -------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF id or local path (default: all-MiniLM-L6-v2)")
    ap.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--sets", default="short,long")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the bare loop and each replica")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--target-batch-latency", type=float, default=None,
                    help="serving.target_batch_latency_s for tuneloop (default: the config default)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, short cells: checks the table only")
    args = ap.parse_args()
    if args.smoke:
        args.seconds, args.warmup = 2.0, 0.5
        if args.concurrency == ap.get_default("concurrency"):
            args.concurrency = "4"

    import ray
    from ray import serve

    from cluster.config import parse_config
    from cluster.server import wait_ready
    from serving.app import APP_NAME, build_app
    from tests.integration.conftest import publish_version

    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    model_dir = build_tiny(work) if args.smoke else prepare_model(args.model, work)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text_sets = {"short": short_texts(2000, rng), "long": long_texts(200, rng, tokenizer)}
    sets = [s for s in args.sets.split(",") if s]
    levels = [int(c) for c in args.concurrency.split(",")]
    from transformers import AutoConfig

    max_length = min(256, AutoConfig.from_pretrained(model_dir).max_position_embeddings)
    batch_size = 32

    print(f"model: {'tiny random BERT (smoke)' if args.smoke else args.model}; threads: {args.threads}; "
          f"target batch latency: {cfg_target(args)}; "
          f"texts: {'SST-2 dev' if SST2.exists() else 'generated'}; cpu cores: {os.cpu_count()}", flush=True)
    bare = {s: bare_throughput(model_dir, text_sets[s], batch_size, args.threads, max_length,
                               max(args.seconds / 2, 2.0)) for s in sets}
    for s in sets:
        print(f"bare {s}: {bare[s]:.1f} texts/s", flush=True)

    cfg = parse_config({
        "models": [{"name": "bench", "base_model": model_dir, "labels": LABELS}],
        "storage": {"root": str(work / "store")},
        "serving": {"max_batch_size": batch_size, "num_cpus_per_replica": args.threads, "max_length": max_length,
                    "max_inputs_per_request": 64, "max_chars_per_input": 100_000,
                    **({"target_batch_latency_s": args.target_batch_latency} if args.target_batch_latency else {})},
    })
    publish_version(cfg, model_dir)

    metrics_dir = str(work / "prom")
    os.makedirs(metrics_dir)
    ray.init(num_cpus=max(4, args.threads + 2), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        serve.run(build_app(cfg, metrics_dir), name=APP_NAME, route_prefix="/", blocking=False)
        wait_ready(base)
        for s in sets:
            for c in levels:
                before = batch_stats(base)
                r = drive(f"{base}/v1/models/bench/predict", lambda t: {"inputs": [t]}, text_sets[s], c,
                          args.seconds, args.warmup)
                after = batch_stats(base)
                mean_batch = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                rows.append(("tuneloop", s, c, r, mean_batch))
                print(f"tuneloop {s} c={c}: {r.throughput:.1f}/s", flush=True)
        serve.delete(APP_NAME)
        if not args.skip_naive:
            serve.run(naive_app(model_dir, args.threads, max_length), name="naive", route_prefix="/naive", blocking=False)
            for s in sets:
                for c in levels:
                    r = drive(f"{base}/naive", lambda t: {"inputs": [t]}, text_sets[s], c, args.seconds, args.warmup)
                    rows.append(("naive", s, c, r, 1.0))
                    print(f"naive {s} c={c}: {r.throughput:.1f}/s", flush=True)
            serve.delete("naive")
    finally:
        serve.shutdown()
        ray.shutdown()

    naive = {(s, c): r.throughput for name, s, c, r, _ in rows if name == "naive"}
    print()
    print("| server | texts | clients | texts/s | p50 ms | p95 ms | p99 ms | mean batch | × bare | × naive | errors |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in sets:
        print(f"| bare model | {s} | - | {bare[s]:.1f} | - | - | - | {batch_size} | 1.00 | - | - |")
    for name, s, c, r, mb in rows:
        vs_naive = f"{r.throughput / naive[(s, c)]:.2f}" if (s, c) in naive and naive[(s, c)] > 0 else "-"
        print(f"| {name} | {s} | {c} | {r.throughput:.1f} | {r.p50 * 1e3:.1f} | {r.p95 * 1e3:.1f} | "
              f"{r.p99 * 1e3:.1f} | {mb:.1f} | {r.throughput / bare[s]:.2f} | {vs_naive} | {r.errors} |")


if __name__ == "__main__":
    main()

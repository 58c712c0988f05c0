"""What idle Ray processes cost a training loop on this machine: the plain loop's train steps
in this process, timed with N idle Ray actors alive and with them killed, alternated.

    .venv/bin/python benchmarks/idle_bench.py [--actors 5,8] [--threads 2,1] [--rounds 4] [--steps 15]

A tuneloop job's worker shares the machine with Ray Train's own actors (its controller,
placement-group cleaner, synchronization actor, dataset manager, and Ray's autoscaling
coordinator: five processes beside the worker, each waking about a hundred times a second
while idle), which no setting of Ray's removes. This measures what that many processes cost
a loop that is not Ray's, apart from everything else a job does. Ray runs throughout; the
actors (``num_cpus=0``, doing nothing) are created before an "alive" probe and killed before
a "killed" one, in the order alive, killed, killed, alive, ... so that the machine's drift
over minutes falls on both alike. Texts: SST-2's train split from ``--data`` when it is
there, else generated sentences (speed, not accuracy, is measured). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from tuneloop.core.model_source import resolve_model_source  # noqa: E402
from benchmarks.adapt_bench import progress  # noqa: E402

BATCH = 32


def _texts(data: Path, n: int) -> list[tuple[str, int]]:
    path = data / "sst2" / "train.tsv"
    if path.exists():
        with path.open() as f:
            rows = [(r["text"], int(r["label"])) for r, _ in zip(csv.DictReader(f, delimiter="\t"), range(n))]
    else:
        words = "the film was a quiet and moving study of grief with fine acting but a slow middle".split()
        rng = random.Random(0)
        rows = [(" ".join(rng.choices(words, k=rng.randint(4, 20))), i % 2) for i in range(n)]
    random.Random(0).shuffle(rows)
    return rows


class _Loop:
    """MiniLM-L6 (or ``--base-model``) with a 2-class head, AdamW, pre-tokenized batches."""

    def __init__(self, base: str, rows: list[tuple[str, int]], steps: int, max_length: int):
        tok = transformers.AutoTokenizer.from_pretrained(base)
        self.net = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-5)
        self.net.train()
        self.batches = []
        for i in range(0, BATCH * steps, BATCH):
            chunk = rows[i:i + BATCH]
            enc = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            self.batches.append({**enc, "labels": torch.tensor([y for _, y in chunk])})

    def samples_per_s(self) -> float:
        t0 = time.perf_counter()
        for batch in self.batches:
            self.net(**batch).loss.backward()
            self.opt.step()
            self.opt.zero_grad()
        return BATCH * len(self.batches) / (time.perf_counter() - t0)


@ray.remote(num_cpus=0)
class _Idle:
    def ready(self) -> bool:
        return True


def _measure(loop: _Loop, actors: int, rounds: int) -> tuple[list[float], list[float]]:
    alive: list[float] = []
    killed: list[float] = []
    loop.samples_per_s()  # warm-up
    for r in range(rounds):
        for state in (("alive", "killed") if r % 2 == 0 else ("killed", "alive")):
            if state == "alive":
                handles = [_Idle.remote() for _ in range(actors)]
                ray.get([h.ready.remote() for h in handles])
                time.sleep(2)  # their start-up is over
                alive.append(loop.samples_per_s())
                for h in handles:
                    ray.kill(h)
            else:
                time.sleep(2)
                killed.append(loop.samples_per_s())
            progress(f"{actors} actors, {torch.get_num_threads()} thread(s), round {r + 1}/{rounds}: "
                     f"{state} {(alive if state == 'alive' else killed)[-1]:.1f} samples/s")
    return alive, killed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--actors", default="5,8", help="idle actor counts, comma-separated")
    ap.add_argument("--threads", default="2,1", help="torch thread counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=4, help="alive/killed pairs per setting")
    ap.add_argument("--steps", type=int, default=15, help="train steps of 32 rows per probe")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--base-model", default="sentence-transformers/all-MiniLM-L6-v2")
    args = ap.parse_args()
    actor_counts = [int(x) for x in args.actors.split(",")]
    thread_counts = [int(x) for x in args.threads.split(",")]
    transformers.logging.set_verbosity_error()
    loop = _Loop(resolve_model_source(args.base_model), _texts(args.data, BATCH * args.steps), args.steps,
                 args.max_length)
    ray.init(num_cpus=max(actor_counts) + 2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    rows = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for actors in actor_counts:
                alive, killed = _measure(loop, actors, args.rounds)
                rows.append((threads, actors, statistics.mean(alive), statistics.mean(killed)))
    finally:
        ray.shutdown()
    print(f"Plain loop's train steps ({args.steps} of {BATCH} rows a probe, {args.rounds} probes each way), "
          "Ray running throughout, idle actors alive or killed:\n")
    print("| torch threads | idle actors | samples/s, actors alive | samples/s, actors killed | alive x killed |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for threads, actors, alive, killed in rows:
        print(f"| {threads} | {actors} | {alive:.1f} | {killed:.1f} | {alive / killed:.2f} |")


if __name__ == "__main__":
    main()

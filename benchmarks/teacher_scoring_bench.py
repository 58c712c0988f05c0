"""A student job's teacher scoring: rows/s as the job scores them against the way it did before.

    .venv/bin/python benchmarks/teacher_scoring_bench.py [--teacher PATH] [--rows 2000] [--threads 2]

The teacher (``--teacher``: a version's folder, a local model or an HF id; default MiniLM-L6)
scores ``--rows`` SST-2 train texts, in a random order as a job's rows come, with
``distill._TeacherScorer`` (the Ray Data actor's class, called here directly: Ray Data's own
cost is not what differs), in batches of ``SCORE_BATCH_SIZE``:

1. **fp32, the job's order**: how jobs scored before (the baseline);
2. **fp32, longest text first**: batches of texts of a length, little padding;
3. **bf16, longest first**: what a job does where the teacher's bf16 passed parity and the
   node computes bf16 natively (skipped elsewhere);

each twice, alternating, the better of the two kept. Ratios are to the baseline of the
same run. Beside the speeds: how far each way's soft labels (softmax at temperature 2, the
distillation default) are from the baseline's, and the share of rows whose top class agrees.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.adapt_bench import progress, read_tsv  # noqa: E402
from tuneloop.core.model_source import resolve_model_source  # noqa: E402
from tuneloop.serving.loaded_models import cpu_class  # noqa: E402
from tuneloop.training.distill import SCORE_BATCH_SIZE, TEACHER_COLUMN, _TeacherScorer  # noqa: E402


def score(scorer: _TeacherScorer, texts: list[str], order: list[int]) -> tuple[np.ndarray, float]:
    """Logits of ``texts`` (in their own order) scored in ``order``, and the seconds taken."""
    out = np.zeros((len(texts), len(scorer.order)), np.float32)
    t0 = time.perf_counter()
    for start in range(0, len(order), SCORE_BATCH_SIZE):
        rows = order[start:start + SCORE_BATCH_SIZE]
        batch = scorer(pa.table({"text": [texts[i] for i in rows]}))
        out[rows] = np.array(batch.column(TEACHER_COLUMN).to_pylist(), np.float32)
    return out, time.perf_counter() - t0


def soft(logits: np.ndarray, temperature: float = 2.0) -> np.ndarray:
    z = logits / temperature
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--teacher", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=64, help="tokens a text is cut at (distill_bench's 64)")
    args = ap.parse_args()
    if args.rows < 1:
        raise SystemExit(f"--rows {args.rows}: score one row at least")
    train = args.data / "sst2" / "train.tsv"
    if not train.is_file():
        raise SystemExit(f"no SST-2 at {train} (see ../shared/data/README.md)")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    texts = [r["text"] for r in read_tsv(train)]
    texts = random.Random(0).sample(texts, min(args.rows, len(texts)))  # a job's rows come shuffled
    path = resolve_model_source(args.teacher)
    config = transformers.AutoConfig.from_pretrained(path)
    head = [config.id2label[i] for i in range(len(config.id2label))]
    job_order = list(range(len(texts)))
    by_length = sorted(job_order, key=lambda i: -len(texts[i]))  # as distill._scored orders them
    native = cpu_class() == "cpu-bf16"  # AVX512-BF16 or AMX, as a job's teacher scorer asks
    ways = [("fp32, the job's order (before)", False, job_order), ("fp32, longest text first", False, by_length)]
    if native:
        ways.append(("bf16, longest text first (now)", True, by_length))
    else:
        progress("this CPU has no native bf16: the bf16 way is skipped, as a job skips it")
    scorers = {bf16: _TeacherScorer({"base_model": path}, "AutoModelForSequenceClassification", head,
                                    args.max_length, use_gpu=False, bf16=bf16) for bf16 in {False, native}}
    warm = texts[:SCORE_BATCH_SIZE * 2]
    for scorer in scorers.values():  # warm up: the first passes allocate
        score(scorer, warm, list(range(len(warm))))
    results: dict[str, tuple[np.ndarray, float]] = {}
    for round_ in range(2):
        for name, bf16, order in ways:
            logits, seconds = score(scorers[bf16], texts, order)
            progress(f"round {round_ + 1}: {name}: {len(texts) / seconds:.1f} rows/s")
            if name not in results or seconds < results[name][1]:
                results[name] = (logits, seconds)
    base_logits, base_s = results[ways[0][0]]
    print(f"{len(texts)} SST-2 train texts, teacher {args.teacher}, {args.threads} threads, batches of "
          f"{SCORE_BATCH_SIZE}, max_length {args.max_length}\n")
    print("| scoring | rows/s | x before | soft labels' largest difference | mean | top class agrees |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, _, _ in ways:
        logits, seconds = results[name]
        diff = np.abs(soft(logits) - soft(base_logits))
        agree = float((logits.argmax(-1) == base_logits.argmax(-1)).mean())
        print(f"| {name} | {len(texts) / seconds:.1f} | {base_s / seconds:.2f} | {diff.max():.4f} | {diff.mean():.5f} "
              f"| {agree:.4f} |")


if __name__ == "__main__":
    main()

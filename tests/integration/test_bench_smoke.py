"""The benchmarks run end to end and print their tables (no timing or quality assertions)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneloop.serving.fast_path import HAPROXY_PORT_VARS
from tests.tiny_models import build_tiny_model

ROOT = Path(__file__).resolve().parents[2]
# Its own Ray and Serve, every cell of the table: about 70 s, so `make bench-smoke`, not `make test`.
pytestmark = pytest.mark.slow


def test_serve_bench_smoke_prints_the_table():
    # The benchmark starts its own Ray and Serve beside this session's: it must not reuse
    # this session's metrics folder or HAProxy side ports.
    private = {"PROMETHEUS_MULTIPROC_DIR", *HAPROXY_PORT_VARS}
    env = {k: v for k, v in os.environ.items() if k not in private}
    out = subprocess.run(
        # One text set: the long set's cells add time, not code paths.
        [sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "--smoke", "--sets", "short"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| server | texts | clients | texts/s | p50 ms")
    servers = {line.split("|")[1].strip() for line in lines[2:]}
    # tuneloop once per runtime (torch, auto): auto names what it chose, an artifact that
    # passed parity or torch.
    others = {s for s in servers if not s.startswith("tuneloop, ")}
    assert "bare model, torch" in others and "naive" in others
    assert all(s == "naive" or s.startswith("bare model, ") for s in others)
    tuneloop = sorted(s for s in servers if s.startswith("tuneloop, "))
    assert tuneloop[0].startswith("tuneloop, auto") and tuneloop[1] == "tuneloop, torch"
    assert "parity passed" in out.stdout  # the version was optimized first
    auto_runtime = tuneloop[0].partition("(")[2].rstrip(")") or "torch"
    if auto_runtime not in ("torch", "torch-bf16"):  # the artifact's own bare loop ran beside it
        assert f"bare model, {auto_runtime}" in others
    for line in lines[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert float(cells[3]) > 0, line  # every cell served something
        if not cells[0].startswith("bare model"):
            assert cells[-1] == "0", line  # and no request failed
        if cells[0].startswith("tuneloop, "):
            assert float(cells[9]) > 0, line  # rated against its own runtime's bare loop too
    assert any(c.startswith("open ") for c in (line.split("|")[3].strip() for line in lines[2:]))
    assert "p99 at half the peak throughput" in out.stdout


def test_task_bench_smoke_prints_both_tables(tmp_path):
    # Stand-ins for ../shared/data in its layout (tests never need it) and a tiny base model:
    # both parts, two plain-loop seeds and the feedback round, in about 3 minutes.
    intents = ["card_arrival", "exchange_rate", "top_up_failed"]
    bank = tmp_path / "data" / "banking77"
    bank.mkdir(parents=True)
    for split, n in (("train", 8), ("test", 3)):  # the texts differ by split: tuneloop drops golden texts from training
        (bank / f"{split}.tsv").write_text("text\tlabel\n" + "".join(
            f"{split} question {j} about {label.replace('_', ' ')}\t{label}\n" for j in range(n) for label in intents))
    conll = tmp_path / "data" / "conll2003"
    conll.mkdir()
    tags = ["B-PER", "O", "B-ORG", "O", "B-LOC", "O", "B-MISC", "I-MISC", "O"]
    for split, n in (("train", 24), ("test", 8), ("dev", 8)):
        (conll / f"{split}.jsonl").write_text("".join(json.dumps(
            {"tokens": ["Ada", "met", "Acme", "in", "Paris", "at", "Euro", "2000", f"{split}{j}"], "tags": tags}) + "\n"
            for j in range(n)))
    base = build_tiny_model(tmp_path / "tiny", intents)
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "task_bench.py"), "--data", str(tmp_path / "data"),
         "--base-model", base, "--epochs", "1", "--plain-seeds", "0,1", "--feedback-rows", "4"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "## intent" in out.stdout and "## ner" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    plain = [r for r in rows if r.startswith("| plain Hugging Face loop")]
    assert [r.split("|")[1].strip().split(", ")[-1] for r in plain] == ["seed 0", "seed 1", "mean of 2 seeds"]
    assert any(r.startswith("| tuneloop job") for r in rows) and any(r.startswith("| tuneloop v2") for r in rows)
    assert "the plain loop's own spread" in out.stdout and "gate on v2:" in out.stdout
    # The jobs' progress reaches stderr through Ray's log monitor; stdout holds the tables alone.
    assert "[tuneloop train] epoch 1/1" in out.stderr
    assert all(not line or line.startswith(("## ", "| ", "BANKING77", "CoNLL", "tuneloop", "the ", "gate"))
               for line in out.stdout.splitlines()), out.stdout


def test_train_bench_smoke_prints_the_table(tmp_path):
    # SST-2's layout (labels 0 and 1) with stand-in texts and a tiny base model: the plain
    # loop around two jobs (1 worker at ZeRO-0, 2 at ZeRO-2 in batches grouped by length), about 2 minutes.
    sst2 = tmp_path / "data" / "sst2"
    sst2.mkdir(parents=True)
    for split, n in (("train", 24), ("dev", 8)):
        (sst2 / f"{split}.tsv").write_text("text\tlabel\n" + "".join(
            f"the {split} film {j} was {'awful' if j % 2 else 'lovely'} \t{1 - j % 2}\n" for j in range(n)))
    base = build_tiny_model(tmp_path / "tiny", ["negative", "positive"])
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_bench.py"), "--data", str(tmp_path / "data"),
         "--base-model", base, "--rows", "16", "--batch-size", "4", "--setups", "1x0,1x0w,2x2g"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    names = [r.split("|")[1].strip() for r in rows[1:]]
    # The plain loop alone before Ray and after it; beside the idle Ray before every job and
    # after the last: the jobs' baselines beside them.
    plain = "plain Hugging Face loop (1 process, 2 threads), "
    assert names == [plain + "alone, before Ray", plain + "beside the idle Ray, run 1",
                     "tuneloop job, 1 worker(s), ZeRO-0", plain + "beside the idle Ray, run 2",
                     "tuneloop job, 1 worker(s), ZeRO-0, each batch one padded pass", plain + "beside the idle Ray, run 3",
                     "tuneloop job, 2 worker(s), ZeRO-2, batches grouped by length", plain + "beside the idle Ray, run 4",
                     plain + "alone, after Ray"]
    for row in rows[1:]:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert float(cells[2]) > 0 and float(cells[1]) >= 0, row  # steady samples/s, start-up
        if "tuneloop" in cells[0]:
            assert float(cells[5]) >= 0 and float(cells[6]) >= 0, row  # evaluation, publishing
            assert float(cells[3]) > 0 and float(cells[4]) > 0, row  # its ratios: beside Ray, alone
            assert 0 <= float(cells[8]) <= 1, row  # its golden accuracy
    assert "Ray's idle processes alone: the plain loop beside them at" in out.stdout
    parts = [line for line in out.stdout.splitlines() if line.startswith("- ") and "worker(s), ZeRO-" in line]
    assert [p.split(":")[0] for p in parts] == ["- 1 worker(s), ZeRO-0", "- 1 worker(s), ZeRO-0, each batch one padded pass",
                                                "- 2 worker(s), ZeRO-2, batches grouped by length"]
    for line in parts:  # each part in seconds
        seconds = dict(kv.rsplit(" ", 1) for kv in line.split(": ", 1)[1].split(", "))
        assert list(seconds) == ["queueing", "workers", "model_load", "deepspeed", "first_batch"], line
        assert all(float(v) >= 0 for v in seconds.values()), line
    assert "the worst of each): steady state" in out.stdout and "[tuneloop train] epoch 2/2" in out.stderr


def test_distill_bench_smoke_prints_both_tables():
    # A tiny random teacher, a 1-layer student and its hard-label twin, each trained,
    # optimized and served over HTTP: about 2.5 minutes.
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill_bench.py"), "--smoke"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines()
            if line.startswith("| ") and "---" not in line]
    models = [r for r in rows if r[0].startswith(("teacher", "student")) and len(r) == 8]
    assert [r[0] for r in models] == ["teacher", "student (alpha 0.5)", "student-hard (alpha 0)"]
    assert [r[1] for r in models] == ["2 x 32", "1 x 32", "1 x 32"]  # the students keep 1 of the teacher's 2 layers
    assert all(0 <= float(r[2]) <= 1 and float(r[5]) > 0 and float(r[6]) > 0 for r in models)
    served = [r for r in rows if len(r) == 7 and r[0] in ("teacher", "student", "student-hard")]
    assert len(served) == 6 and all(float(r[2]) > 0 and r[5] == "0" for r in served)  # texts/s, no errors
    assert "student at 64 clients:" in out.stdout
    assert "[tuneloop train] student: layers [1] of the teacher's 2" in out.stderr


def test_idle_bench_smoke_prints_the_table(tmp_path):
    # Generated texts (no --data there), a tiny model, one actor: about 30 s.
    base = build_tiny_model(tmp_path / "tiny", ["negative", "positive"])
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "idle_bench.py"), "--data", str(tmp_path / "none"),
         "--base-model", base, "--actors", "1,2", "--threads", "1", "--rounds", "2", "--steps", "2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| torch threads | idle actors | samples/s, actors alive")
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows[1:]]
    assert [(c[0], c[1]) for c in cells] == [("1", "1"), ("1", "2")]
    for c in cells:
        alive, killed, ratio = float(c[2]), float(c[3]), float(c[4])
        assert alive > 0 and killed > 0 and abs(ratio - round(alive / killed, 2)) <= 0.011, c
    assert "round 2/2: alive" in out.stderr  # a line per probe


def test_rollout_bench_smoke_decides_both_rollouts():
    # A tiny model served with a shadow, then a better challenger to production and a worse
    # canary rolled back by the controller: about 90 s.
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rollout_bench.py"), "--smoke"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines()
            if line.startswith("| ") and "---" not in line]
    shadow = {r[0]: r for r in rows if r[0].startswith(("production alone", "with a shadow"))}
    assert len(shadow) == 3 and all(r[3] == "0" for r in shadow.values())  # alone, shadowed, alone; no errors
    decided = {r[0]: r[1] for r in rows if r[0].startswith(("better challenger", "worse canary"))}
    failed = [r[3] for r in rows if r[0].startswith(("better challenger", "worse canary"))]
    assert len(failed) == 2 and all(f.isdigit() for f in failed)  # failures counted, not dropped
    assert "production" in decided["better challenger, shadow to production"]
    assert "rolled back" in decided["worse canary at 50%, to rollback"]


def test_student_ceiling_smoke_prints_its_checks(tmp_path):
    # A tiny random model on 64 generated rows, a check every 2 steps: seconds.
    base = build_tiny_model(tmp_path / "tiny", ["negative", "positive"])
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "student_ceiling.py"), "--smoke",
                          "--base-model", base, "--epochs", "2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    checks = result["checks"]  # 64 rows in batches of 32, two epochs: 4 steps, a check every 2
    assert result["rows"] == 64 and [(c["step"], c["epoch"]) for c in checks] == [(2, 1), (4, 2)]
    assert all(0 <= c["dev_accuracy"] <= 1 for c in checks) and result["last"] == checks[-1]
    assert "step 4/4: SST-2 dev accuracy" in out.stderr  # a line per check

"""What a retraining job trains and evaluates on, over real Parquet feedback and a real
registry (no Ray): fresh feedback after the parent's watermark with its newest share kept
back, a stratified replay sample, a frozen golden set, and a reservoir carried from version
to version."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pytest

from tuneloop.core.config import parse_config
from tuneloop.core.evaluation import EvalMetrics
from tuneloop.core.tasks import make_task, model_tasks
from tuneloop.store.feedback_store import FeedbackStore
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage
from tuneloop.training.data import read_dataset, read_texts
from tuneloop.training.job_data import assemble, with_training_columns


@pytest.fixture
def env(tmp_path):
    seed = tmp_path / "seed.tsv"
    rows = [(f"seed text {i}", "positive" if i % 2 else "negative") for i in range(100)]
    seed.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))
    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["negative", "positive"],
                                    "seed_dataset": str(seed)}],
                        "storage": {"root": str(tmp_path / "store")},
                        "training": {"replay_ratio": 1.0, "eval_fraction": 0.2, "max_rows_per_job": 1000,
                                     "reservoir_size": 30, "early_stopping_patience": None}})
    storage = Storage(cfg.storage.root)
    tasks = model_tasks(cfg.models)
    feedback = FeedbackStore(storage, str(tmp_path / "journal"), tasks)
    feedback.open_writer()
    yield cfg, tasks["m"], Registry(storage), feedback, tmp_path
    feedback.close()


def _publish(registry: Registry, tmp_path, data, version_of, summary, golden_accuracy: float | None = None) -> Manifest:
    """Publish a version as a job does: its summary (watermark), its reservoir and held rows."""
    weights = tmp_path / f"weights-{version_of}"
    weights.mkdir()
    metrics = None if golden_accuracy is None else EvalMetrics(accuracy=golden_accuracy, precision=0, recall=0, f1=0,
                                                               eval_rows=20)
    manifest = Manifest(version="pending", model="m", parent=None, base_model="x", task="text-classification",
                        labels=["negative", "positive"], data=summary, metrics=metrics)
    return registry.publish("m", str(weights), manifest, tables={"reservoir": data.reservoir, "held": data.held,
                                                                 "answered": data.answered})


def _give(feedback: FeedbackStore, n: int, start: int = 0, label: str = "positive", **extra) -> list[str]:
    ids = [feedback.append(model="m", text=f"feedback {start + i}", label=label, **extra) for i in range(n)]
    feedback.compact()
    return ids


def _on_v1(feedback: FeedbackStore, kind: str, label: str, key_id: str, ids: range) -> list[str]:
    """Answers on v1's predictions, which all said "positive": ``kind`` "honest" answers
    prediction i, "flipped" prediction 1000 + i (its text says which); their feedback ids."""
    first = 0 if kind == "honest" else 1000
    return [feedback.append(model="m", text=f"{kind} {i}", label=label, prediction_id=f"{first + i:032x}",
                            version="v1", predicted_label="positive", key_id=key_id) for i in ids]


def test_a_job_after_a_rejected_version_draws_a_new_sample(env):
    """Seeded by the parent alone, a job with no new feedback after a rejected one (a
    student whose teacher changed) trained on the same replay sample, in the same order."""
    cfg, task, registry, feedback, tmp_path = env
    tcfg = cfg.training.model_copy(update={"max_rows_per_job": 30})
    first = assemble(task, cfg.model("m"), tcfg, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary)
    registry.promote("m", v1.version)
    before = assemble(task, cfg.model("m"), tcfg, registry, feedback, v1)
    assert before.train.equals(assemble(task, cfg.model("m"), tcfg, registry, feedback, v1).train)  # reproducible
    _publish(registry, tmp_path, before, "v2", before.summary)  # v2, say rejected: v1 stays production
    after = assemble(task, cfg.model("m"), tcfg, registry, feedback, v1)
    assert after.train.num_rows == before.train.num_rows == 30
    assert set(after.train.column("text").to_pylist()) != set(before.train.column("text").to_pylist())


def test_first_job_learns_the_seed_and_freezes_a_stratified_golden_set(env):
    cfg, task, registry, feedback, _ = env
    data = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    assert data.golden.num_rows == 20 and Counter(data.golden.column("label").to_pylist()) == {
        "negative": 10, "positive": 10}
    golden_texts = set(data.golden.column("text").to_pylist())
    assert data.train.num_rows == 80 and not golden_texts & set(data.train.column("text").to_pylist())
    assert data.summary["golden"]["rows"] == 20 and data.summary["golden"]["sha256"]
    again = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    assert again.golden.equals(data.golden)  # frozen: the same rows every job
    assert with_training_columns(task, data.train).column_names == ["text", "label_id"]


def test_a_seed_row_the_model_cannot_learn_fails_the_job_before_a_golden_set_is_frozen(env):
    cfg, task, registry, feedback, tmp_path = env
    seed = tmp_path / "seed.tsv"
    good = seed.read_text()
    seed.write_text(good + "a typo in a label\tPositive\n")
    with pytest.raises(ValueError, match=r"seed.tsv': rows have labels \['Positive'\] outside"):
        assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    assert registry.golden("m") is None  # nothing frozen: fixing the file is enough
    jsonl = tmp_path / "seed.jsonl"
    jsonl.write_text('{"text": "fine", "label": "positive"}\n{"text": null, "label": "negative"}\n')
    with pytest.raises(ValueError, match=r"seed.jsonl', row 2: no 'text'"):
        read_dataset(str(jsonl), task)
    seed.write_text(good)
    assert assemble(task, cfg.model("m"), cfg.training, registry, feedback, None).golden.num_rows == 20


def test_a_seed_corrected_after_a_failed_first_job_is_sampled_anew_until_a_version_is_published(env):
    """The first job froze a sample of a seed of one class, then failed on it; the seed the
    user corrected was never sampled, and the golden set held one class for good."""
    cfg, task, registry, feedback, tmp_path = env
    seed = tmp_path / "seed.tsv"
    good = seed.read_text()
    seed.write_text("text\tlabel\n" + "".join(f"only negative {i}\tnegative\n" for i in range(100)))
    with pytest.raises(ValueError, match=r"\['negative'\] alone"):
        assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    assert set(registry.golden("m").column("label").to_pylist()) == {"negative"}  # frozen before the check
    seed.write_text(good)
    first = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    assert Counter(first.golden.column("label").to_pylist()) == {"negative": 10, "positive": 10}
    v1 = _publish(registry, tmp_path, first, "v1", first.summary)
    seed.write_text(good + "".join(f"added later {i}\tpositive\n" for i in range(50)))
    child = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v1)
    assert child.golden.equals(first.golden)  # a version was judged on it: frozen for good


def test_a_child_trains_on_fresh_feedback_plus_as_much_replay_and_keeps_the_newest_back(env):
    cfg, task, registry, feedback, tmp_path = env
    first = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary)
    _give(feedback, 50)
    data = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v1)
    fb = data.summary["feedback"]
    assert (fb["fresh_rows"], fb["trained_rows"], fb["kept_back_rows"]) == (50, 40, 10)
    sources = Counter(data.train.column("source").to_pylist())
    assert sources == {"feedback": 40, "seed": 40}  # replay ratio 1; v1's reservoir holds no feedback yet
    kept = data.fresh_eval.column("text").to_pylist()
    in_order = feedback.read_since("m", None).column("text").to_pylist()
    assert kept == in_order[-10:]  # the newest, by arrival (ties in a millisecond by feedback id)
    assert data.reservoir.num_rows == 30 and data.summary["reservoir"]["seen"] == 40
    # The next job starts after the watermark: the kept-back rows are fresh for it, and trained on.
    v2 = _publish(registry, tmp_path, data, "v2", data.summary)
    _give(feedback, 10, start=50)
    nxt = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v2)
    trained = {t for t, s in zip(nxt.train.column("text").to_pylist(), nxt.train.column("source").to_pylist(),
                                 strict=True) if s == "feedback"}
    assert set(kept) <= trained and nxt.summary["feedback"]["fresh_rows"] == 20
    assert Counter(nxt.train.column("source").to_pylist())["replay"] > 0  # earlier feedback is replayed


def test_a_users_answer_on_a_seed_text_replaces_the_seeds_row_in_replay(env):
    """Feedback given as model + text has no prediction id: a correction of a seed text
    trained beside the seed's old label, which every later job replayed again."""
    cfg, task, registry, feedback, tmp_path = env
    first = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary)
    trained = [r for r in first.train.to_pylist() if r["text"].startswith("seed text")][:10]
    corrected = {r["text"]: ("negative" if r["label"] == "positive" else "positive") for r in trained}
    for text, label in corrected.items():
        feedback.append(model="m", text=f"  {text.upper()} ", label=label)  # the same text, written otherwise
    _give(feedback, 200, start=1000)  # more answers than the reservoir (30 rows) keeps
    second = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v1)
    rows = second.train.to_pylist() + second.fresh_eval.to_pylist() + second.validation.to_pylist()
    said = [r for r in rows if r["text"].strip().lower() in corrected]
    assert len(said) == 10 and all(r["source"] == "feedback" for r in said)  # the seed's rows are out
    v2 = _publish(registry, tmp_path, second, "v2", second.summary)
    kept = {r["text"].strip().lower() for r in second.reservoir.to_pylist()} & set(corrected)
    assert len(kept) < 10  # the reservoir, a sample, forgot some corrections
    third = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v2)  # replay only
    assert not [r for r in third.train.to_pylist() if r["source"] == "seed" and r["text"] in corrected]
    assert set(third.answered.column("text").to_pylist()) == set(corrected)  # carried on to v3's children


def test_another_tools_undated_rows_train_first_and_move_no_watermark(env):
    """Rows a backfill stored without created_at sorted last, among the newest kept back for
    the gate, and the job failed setting its watermark from one of them."""
    import pyarrow.parquet as pq

    cfg, task, registry, feedback, tmp_path = env
    _give(feedback, 30)
    day = tmp_path / "store/feedback/m/date=2026-01-02"
    day.mkdir(parents=True)
    pq.write_table(pa.table({"model": ["m"] * 50, "text": [f"backfill {i}" for i in range(50)],
                             "label": ["negative"] * 50}), day / "backfill.parquet")
    data = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    kept_back = data.fresh_eval.column("text").to_pylist()  # the newest 16 of 80: ours, dated, last
    assert len(kept_back) == 16 and all(t.startswith("feedback ") for t in kept_back)
    assert sum(t.startswith("backfill ") for t in data.train.column("text").to_pylist()) == 50
    assert data.summary["watermark"]["feedback_id"]  # from the newest dated row trained


def test_kept_back_rows_repeating_a_text_the_job_trains_on_are_no_evidence(env):
    """A seed text sent as feedback: the gate's McNemar test counted the candidate right on
    text it had just learned. And a text answered twice in one job (a frequent query): the
    newer answer replaces the older, as it does a reservoir's row; both trained, opposite
    labels side by side, and both went into the reservoir."""
    cfg, task, registry, feedback, tmp_path = env
    first = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary)
    _give(feedback, 40)
    seed_texts = set(first.train.column("text").to_pylist())
    feedback.append(model="m", text="  Feedback 3 ", label="negative")  # the 4th fresh text, spaced and cased
    feedback.append(model="m", text=sorted(seed_texts)[0], label="negative")  # gone if replay trains on it
    for i in range(8):
        feedback.append(model="m", text=f"new text {i}", label="positive")
    feedback.compact()
    data = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v1)
    kept = data.fresh_eval.column("text").to_pylist()
    trained = {t.strip().lower() for t in data.train.column("text").to_pylist()}
    seed_kept = [] if sorted(seed_texts)[0] in trained else [sorted(seed_texts)[0]]
    assert kept == seed_kept + [f"new text {i}" for i in range(8)] and not {t.lower() for t in kept} & trained
    fb = data.summary["feedback"]
    assert (fb["fresh_rows"], fb["superseded"], fb["kept_back_rows"], fb["kept_back_repeating_training"]) == (
        49, 1, 8 + len(seed_kept), 1 - len(seed_kept))
    answers = [r for t in (data.train, data.validation, data.fresh_eval, data.reservoir) for r in t.to_pylist()
               if r["text"].strip().lower() == "feedback 3"]
    assert {(r["text"], r["label"]) for r in answers} == {("  Feedback 3 ", "negative")}


def test_latest_answer_per_prediction_wins_and_golden_texts_never_train(env):
    cfg, task, registry, feedback, tmp_path = env
    first = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary)
    golden_text = first.golden.column("text").to_pylist()[0]
    feedback.append(model="m", text="p", label="negative", prediction_id="a" * 32, version="v1",
                    predicted_label="positive")
    feedback.append(model="m", text="p", label="positive", prediction_id="a" * 32, version="v1",
                    predicted_label="positive")
    feedback.append(model="m", text=golden_text.upper(), label="positive")
    # The same text with a zero-width space, as some editors paste it: invisible, and no other text.
    feedback.append(model="m", text=golden_text.replace(" ", " \u200b", 1) + "\u200b", label="negative")
    _give(feedback, 10)
    data = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v1)
    # One text, answered twice (the newer answer replaces the older), and a golden one: never trained.
    assert data.summary["feedback"]["superseded"] == 2 and data.summary["feedback"]["on_golden_texts"] == 1
    rows = data.train.to_pylist() + data.fresh_eval.to_pylist()
    assert [r["label"] for r in rows if r["text"] == "p"] == ["positive"]
    assert not any(r["text"].replace("\u200b", "").lower() == golden_text.lower() for r in rows)


def test_the_row_budget_caps_replay_then_fresh(env):
    cfg, task, registry, feedback, tmp_path = env
    tight = cfg.training.model_copy(update={"max_rows_per_job": 30})
    first = assemble(task, cfg.model("m"), tight, registry, feedback, None)
    assert first.train.num_rows == 30
    v1 = _publish(registry, tmp_path, first, "v1", first.summary)
    _give(feedback, 100)
    data = assemble(task, cfg.model("m"), tight, registry, feedback, v1)
    fb = data.summary["feedback"]
    assert data.train.num_rows == 30 and fb["trained_rows"] == 30 and fb["left_for_next_job"] == 50
    assert data.summary["replay"]["rows"] == 0


def test_the_row_budget_caps_the_kept_back_and_validation_rows_too(env):
    """After a backlog, a fifth of every fresh row was kept back: scored by candidate and
    production for the gate, and every epoch for early stopping, whatever the budget."""
    cfg, task, registry, feedback, tmp_path = env
    tight = cfg.training.model_copy(update={"max_rows_per_job": 30, "early_stopping_patience": 1, "epochs": 3})
    first = assemble(task, cfg.model("m"), tight, registry, feedback, None)
    assert first.validation.num_rows == 16  # a fifth of the 80 rows the seed leaves to train on: within 30
    low = tight.model_copy(update={"max_rows_per_job": 10})
    assert assemble(task, cfg.model("m"), low, registry, feedback, None).validation.num_rows == 10  # v1's, of the seed
    v1 = _publish(registry, tmp_path, first, "v1", first.summary)
    _give(feedback, 400)
    data = assemble(task, cfg.model("m"), tight, registry, feedback, v1)
    fb = data.summary["feedback"]
    assert (data.fresh_eval.num_rows, data.validation.num_rows, fb["trained_rows"]) == (30, 30, 30)
    assert fb["left_for_next_job"] == 400 - 90


def test_a_first_version_of_one_class_is_refused_and_one_lacking_labels_said(env, caplog):
    """A golden file cut from the seed took every row of the other classes: v1 trained on one
    class, answered it to everything, and the gate, with no production to compare, promoted it."""
    cfg, task, registry, feedback, tmp_path = env
    _give(feedback, 40)  # fresh rows of "positive" alone fill a budget of 10
    low = cfg.training.model_copy(update={"max_rows_per_job": 10})
    with pytest.raises(ValueError, match=r"would train on rows of \['positive'\] alone .* none of \['negative'\]"):
        assemble(task, cfg.model("m"), low, registry, feedback, None)
    three = make_task("text-classification", ["negative", "neutral", "positive"])
    with caplog.at_level("WARNING"):
        assemble(three, cfg.model("m").model_copy(update={"labels": ["negative", "neutral", "positive"]}),
                 cfg.training, registry, feedback, None)
    assert any("trains on no row of ['neutral']" in r.getMessage() for r in caplog.records)


def test_without_new_feedback_a_job_replays(env):
    cfg, task, registry, feedback, tmp_path = env
    first = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary)
    data = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v1)
    assert data.summary["feedback"]["fresh_rows"] == 0 and data.train.num_rows == 80


def test_old_train_runs_of_a_model_are_pruned_and_other_models_kept(tmp_path):
    import os

    from tuneloop.training.launcher import _prune_train_runs

    storage = Storage(str(tmp_path / "store"))
    names = [f"a-{i:016x}" for i in range(4)] + ["a-b-0000000000000000"]
    for age, name in enumerate(names):
        run = tmp_path / "store/train_runs" / name
        run.mkdir(parents=True)
        (run / "checkpoint.bin").write_bytes(b"w")
        os.utime(run, (1_000_000 + age, 1_000_000 + age))
    _prune_train_runs(storage, "a", keep=2)
    assert sorted(p.name for p in (tmp_path / "store/train_runs").iterdir()) == [
        "a-0000000000000002", "a-0000000000000003", "a-b-0000000000000000"]


def test_train_runs_are_kept_by_their_jobs_start_not_the_folders_time(tmp_path):
    """An object store gives a folder no modification time: the runs kept were the
    listing's last, not the newest."""
    import os

    from tuneloop.store.jobs import JobRecord, JobStore
    from tuneloop.training.launcher import _prune_train_runs

    storage = Storage(str(tmp_path / "store"))
    for i in range(4):
        JobStore(storage).save(JobRecord(job_id=f"{i:016x}", model="a", trigger="manual", state="succeeded",
                                         created_at=f"2026-01-0{i + 1}T00:00:00.000+00:00"))
        run = tmp_path / "store/train_runs" / f"a-{i:016x}"
        run.mkdir(parents=True)
        os.utime(run, (2_000_000 - i, 2_000_000 - i))  # folders' times the other way round
    _prune_train_runs(storage, "a", keep=2)
    assert sorted(p.name for p in (tmp_path / "store/train_runs").iterdir()) == [
        "a-0000000000000002", "a-0000000000000003"]


def test_a_key_flipping_labels_is_held_out_until_released_then_trained(env):
    """One key answers 60 predictions, saying production (90% right on the golden set) was
    wrong every time: the job quarantines the key, trains on none of its rows and keeps them
    in the held table; once an admin releases the key, the next job trains on all of them."""
    from tuneloop.store.quarantine import QuarantineBook

    cfg, task, registry, feedback, tmp_path = env
    first = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary, golden_accuracy=0.9)
    honest = _on_v1(feedback, "honest", "positive", "aaaaaaaa", range(10))
    flipped = _on_v1(feedback, "flipped", "negative", "bbbbbbbb", range(60))
    honest += _on_v1(feedback, "honest", "positive", "aaaaaaaa", range(10, 40))
    feedback.compact()
    data = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v1)
    q = data.summary["quarantine"]
    assert set(q["flagged"]) == {"bbbbbbbb"} and "0% of 60 predictions" in q["flagged"]["bbbbbbbb"]
    assert q["held_rows"] == 60 and q["keys"]["aaaaaaaa"]["production_agreement"] == 1.0
    assert "against 95%, the median of 1 other key(s) and production's golden accuracy 90%" in q["flagged"]["bbbbbbbb"]
    seen = set(data.train.column("feedback_id").to_pylist()) | set(data.fresh_eval.column("feedback_id").to_pylist())
    assert seen.isdisjoint(flipped) and set(honest) <= seen | set(data.validation.column("feedback_id").to_pylist())
    assert sorted(data.held.column("feedback_id").to_pylist()) == sorted(flipped)
    book = QuarantineBook(registry.storage)
    assert book.quarantined("m") == {"bbbbbbbb"}

    # Still held a job later; the watermark (the newest trained honest row) is past them all.
    v2 = _publish(registry, tmp_path, data, "v2", data.summary, golden_accuracy=0.9)
    later = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v2)
    assert later.held.num_rows == 60 and later.summary["quarantine"]["released_rows"] == 0
    book.release("m", "bbbbbbbb")
    released = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v2)
    assert released.held.num_rows == 0 and released.summary["quarantine"]["released_rows"] == 60
    trained = [i for i in released.train.column("feedback_id").to_pylist() if i]  # seed rows have none
    evaluated = released.fresh_eval.column("feedback_id").to_pylist()
    assert len(trained) == len(set(trained)) and set(trained).isdisjoint(evaluated)  # each row once, never both
    assert set(flipped) <= set(trained)
    assert released.summary["quarantine"]["flagged"] == {}  # a released key is not flagged again


def test_a_key_held_later_replays_none_of_the_rows_it_sent_before(env):
    """A key's first rows, too few to judge it, train and enter the reservoir; once a later
    job holds the key, none of them is replayed, and a release brings them back."""
    from tuneloop.store.quarantine import QuarantineBook

    cfg, task, registry, feedback, tmp_path = env
    tcfg = cfg.training.model_copy(update={"reservoir_size": 1000})
    first = assemble(task, cfg.model("m"), tcfg, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary, golden_accuracy=0.9)
    early = _on_v1(feedback, "flipped", "negative", "bbbbbbbb", range(15))  # under min_rows: not judged
    _on_v1(feedback, "honest", "positive", "aaaaaaaa", range(30))
    feedback.compact()
    second = assemble(task, cfg.model("m"), tcfg, registry, feedback, v1)
    assert second.summary["quarantine"]["flagged"] == {}
    in_reservoir = set(early) & set(second.reservoir.column("feedback_id").to_pylist())
    assert in_reservoir  # trained, and sampled into the reservoir
    v2 = _publish(registry, tmp_path, second, "v2", second.summary, golden_accuracy=0.9)
    _on_v1(feedback, "flipped", "negative", "bbbbbbbb", range(15, 60))
    _on_v1(feedback, "honest", "positive", "aaaaaaaa", range(30, 60))
    feedback.compact()
    third = assemble(task, cfg.model("m"), tcfg, registry, feedback, v2)
    assert set(third.summary["quarantine"]["flagged"]) == {"bbbbbbbb"}
    assert third.summary["quarantine"]["held_replay_rows"] == len(in_reservoir)
    assert in_reservoir.isdisjoint(third.train.column("feedback_id").to_pylist())
    assert in_reservoir <= set(third.reservoir.column("feedback_id").to_pylist())  # kept for a release
    QuarantineBook(registry.storage).release("m", "bbbbbbbb")
    released = assemble(task, cfg.model("m"), tcfg, registry, feedback, v2)
    assert released.summary["quarantine"]["held_replay_rows"] == 0


def test_a_held_answer_replaced_by_a_newer_one_is_not_trained_when_its_key_is_released(env):
    """Latest answer wins: a held key's answers on predictions that users answered again
    since trained, once released, over the newer answers (which the reservoir also replayed)."""
    from tuneloop.store.quarantine import QuarantineBook

    cfg, task, registry, feedback, tmp_path = env
    first = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary, golden_accuracy=0.9)
    stale = _on_v1(feedback, "flipped", "negative", "bbbbbbbb", range(60))
    _on_v1(feedback, "honest", "positive", "aaaaaaaa", range(40))  # after them: the watermark passes the held rows
    feedback.compact()
    held = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v1)
    assert held.held.num_rows == 60
    v2 = _publish(registry, tmp_path, held, "v2", held.summary, golden_accuracy=0.9)
    _on_v1(feedback, "flipped", "positive", "aaaaaaaa", range(25))  # users answer 25 again, agreeing with production
    feedback.compact()
    answered = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v2)  # trains them; B still held
    v3 = _publish(registry, tmp_path, answered, "v3", answered.summary, golden_accuracy=0.9)
    QuarantineBook(registry.storage).release("m", "bbbbbbbb")
    released = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v3)
    trained = set(released.train.column("feedback_id").to_pylist())
    assert trained.isdisjoint(stale[:25]) and set(stale[25:]) <= trained
    assert released.summary["quarantine"]["released_rows"] == 35


def test_a_released_answer_older_than_the_reservoirs_on_its_text_is_not_trained(env):
    """A held key's answer on a text another key answered since (as model + text, another
    prediction id) came back at its release beside the newer answer in the reservoir:
    opposite labels side by side, and both replayed from then on."""
    from tuneloop.store.quarantine import QuarantineBook

    cfg, task, registry, feedback, tmp_path = env
    tcfg = cfg.training.model_copy(update={"reservoir_size": 1000})
    first = assemble(task, cfg.model("m"), tcfg, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary, golden_accuracy=0.9)
    held_ids = _on_v1(feedback, "flipped", "negative", "bbbbbbbb", range(60))
    _on_v1(feedback, "honest", "positive", "aaaaaaaa", range(40))
    feedback.compact()
    held = assemble(task, cfg.model("m"), tcfg, registry, feedback, v1)
    assert held.held.num_rows == 60
    v2 = _publish(registry, tmp_path, held, "v2", held.summary, golden_accuracy=0.9)
    since = [feedback.append(model="m", text=f"Flipped  {i}", label="positive", key_id="cccccccc") for i in range(20)]
    _give(feedback, 20)  # fresh rows after them: the 20 answers train, and enter the reservoir
    answered = assemble(task, cfg.model("m"), tcfg, registry, feedback, v2)
    assert set(since) <= set(answered.reservoir.column("feedback_id").to_pylist())
    v3 = _publish(registry, tmp_path, answered, "v3", answered.summary, golden_accuracy=0.9)
    QuarantineBook(registry.storage).release("m", "bbbbbbbb")
    released = assemble(task, cfg.model("m"), tcfg, registry, feedback, v3)
    trained = set(released.train.column("feedback_id").to_pylist())
    assert trained.isdisjoint(held_ids[:20]) and set(held_ids[20:]) <= trained
    assert released.summary["quarantine"]["released_rows"] == 40
    kept = set(released.reservoir.column("feedback_id").to_pylist())
    assert set(since) & kept and not set(held_ids[:20]) & kept  # the newer answers stay, alone on their texts
    texts = [t.lower() for t in released.train.column("text").to_pylist()]
    assert all(texts.count(t) == 1 for t in texts if t.startswith("flipped"))


def test_a_held_answer_replaced_within_its_own_window_is_never_held_nor_released(env):
    """The replacement came in the same job's window as the held answer: the job trained the
    newer answer, and must not keep the older one to release over it later."""
    from tuneloop.store.quarantine import QuarantineBook

    cfg, task, registry, feedback, tmp_path = env
    first = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary, golden_accuracy=0.9)
    stale = _on_v1(feedback, "flipped", "negative", "bbbbbbbb", range(60))
    newer = _on_v1(feedback, "flipped", "positive", "aaaaaaaa", range(25))
    _on_v1(feedback, "honest", "positive", "aaaaaaaa", range(40))
    feedback.compact()
    data = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v1)
    assert set(data.summary["quarantine"]["flagged"]) == {"bbbbbbbb"}
    assert sorted(data.held.column("feedback_id").to_pylist()) == sorted(stale[25:])
    seen = {i for t in (data.train, data.validation, data.fresh_eval) for i in t.column("feedback_id").to_pylist()}
    assert set(newer) <= seen
    v2 = _publish(registry, tmp_path, data, "v2", data.summary, golden_accuracy=0.9)
    QuarantineBook(registry.storage).release("m", "bbbbbbbb")
    released = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v2)
    assert released.summary["quarantine"]["released_rows"] == 35
    assert set(released.train.column("feedback_id").to_pylist()).isdisjoint(stale[:25])


def _held_flipped_rows(env):
    """v1 with a 40-row budget, then 40 honest answers and, between them, 60 flipped ones
    of key bbbbbbbb, which the next job holds: (that job's data, the flipped ids, tight)."""
    cfg, task, registry, feedback, tmp_path = env
    tight = cfg.training.model_copy(update={"max_rows_per_job": 40})
    first = assemble(task, cfg.model("m"), tight, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary, golden_accuracy=0.9)
    _on_v1(feedback, "honest", "positive", "aaaaaaaa", range(10))
    flipped = _on_v1(feedback, "flipped", "negative", "bbbbbbbb", range(60))
    # The watermark lies past the flipped rows: released, they are not fresh again.
    _on_v1(feedback, "honest", "positive", "aaaaaaaa", range(10, 40))
    feedback.compact()
    return assemble(task, cfg.model("m"), tight, registry, feedback, v1), flipped, tight


def test_released_rows_train_within_the_row_budget_and_the_rest_wait_for_the_next_job(env):
    from tuneloop.store.quarantine import QuarantineBook

    cfg, task, registry, feedback, tmp_path = env
    data, flipped, tight = _held_flipped_rows(env)
    assert data.held.num_rows == 60
    v2 = _publish(registry, tmp_path, data, "v2", data.summary, golden_accuracy=0.9)
    QuarantineBook(registry.storage).release("m", "bbbbbbbb")

    now = assemble(task, cfg.model("m"), tight, registry, feedback, v2)
    q, fresh = now.summary["quarantine"], now.summary["feedback"]["trained_rows"]
    assert now.train.num_rows == 40 and q["released_rows"] == 40 - fresh and q["released_waiting_rows"] == 20 + fresh
    assert q["held_rows"] == 0 and now.held.num_rows == 20 + fresh  # kept, to be released again
    v3 = _publish(registry, tmp_path, now, "v3", now.summary, golden_accuracy=0.9)
    later = assemble(task, cfg.model("m"), tight, registry, feedback, v3)
    assert later.summary["quarantine"]["released_rows"] == 20 + fresh and later.held.num_rows == 0
    trained = [r["feedback_id"] for d in (now, later) for r in d.train.to_pylist()
               if r["feedback_id"] in flipped and r["source"] != "replay"]
    assert sorted(trained) == sorted(flipped)  # every released row trained, once (replay aside)


def test_released_rows_are_taken_in_arrival_order_whatever_the_held_tables_order(env):
    """A held table is [still held, newly held, waiting], the waiting rows older: released,
    the newest rows went first within the row budget, and a newer answer on a text lost to
    an older one."""
    from dataclasses import replace

    from tuneloop.store.quarantine import QuarantineBook

    cfg, task, registry, feedback, tmp_path = env
    data, flipped, tight = _held_flipped_rows(env)
    reversed_held = data.held.take(list(range(data.held.num_rows - 1, -1, -1)))  # newest first
    v2 = _publish(registry, tmp_path, replace(data, held=reversed_held), "v2", data.summary, golden_accuracy=0.9)
    QuarantineBook(registry.storage).release("m", "bbbbbbbb")
    now = assemble(task, cfg.model("m"), tight, registry, feedback, v2)
    released = now.summary["quarantine"]["released_rows"]
    trained = {r["feedback_id"] for r in now.train.to_pylist() if r["feedback_id"] in flipped}
    assert released and trained == set(flipped[:released])  # the oldest first


def test_early_stopping_watches_its_own_rows_never_the_gates(env):
    """With early stopping on, the fresh rows before the kept-back ones are its validation
    set: [trained | validation | kept back], and the next job trains on both."""
    cfg, task, registry, feedback, tmp_path = env
    watching = cfg.training.model_copy(update={"early_stopping_patience": 2, "epochs": 3})
    first = assemble(task, cfg.model("m"), watching, registry, feedback, None)
    # v1 has no fresh feedback: it watches a stratified fifth of the seed it would train on,
    # never the golden set (which then judged the epoch it picked).
    val = first.validation.column("text").to_pylist()
    assert len(val) == 16 and Counter(first.validation.column("label").to_pylist()) == {"negative": 8, "positive": 8}
    assert not set(val) & (set(first.train.column("text").to_pylist()) | set(first.golden.column("text").to_pylist()))
    assert first.train.num_rows == 64 and first.summary["validation"] == {"rows": 16, "source": "seed"}
    # eval_fraction 0 holds nothing back: the summary names no source (v1 then watches the golden set).
    unheld = assemble(task, cfg.model("m"), watching.model_copy(update={"eval_fraction": 0.0}), registry, feedback, None)
    assert unheld.validation.num_rows == 0 and unheld.summary["validation"] == {"rows": 0, "source": None}
    v1 = _publish(registry, tmp_path, first, "v1", first.summary)
    ids = _give(feedback, 50)
    data = assemble(task, cfg.model("m"), watching, registry, feedback, v1)
    fb = data.summary["feedback"]
    assert (fb["trained_rows"], fb["validation_rows"], fb["kept_back_rows"]) == (32, 8, 10)
    in_order = feedback.read_since("m", None).column("feedback_id").to_pylist()
    assert data.validation.column("feedback_id").to_pylist() == in_order[32:40]
    assert set(in_order[:32]) <= set(data.train.column("feedback_id").to_pylist()) and set(ids) == set(in_order)
    v2 = _publish(registry, tmp_path, data, "v2", data.summary)
    nxt = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v2)
    assert set(in_order[32:]) <= set(nxt.train.column("feedback_id").to_pylist()) | set(
        nxt.fresh_eval.column("feedback_id").to_pylist())


def test_held_rows_past_the_watermark_come_back_once_as_fresh_when_released(env):
    cfg, task, registry, feedback, tmp_path = env
    first = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary, golden_accuracy=0.9)
    _on_v1(feedback, "flipped", "negative", "bbbbbbbb", range(25))
    feedback.compact()
    data = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v1)
    assert data.held.num_rows == 25 and data.summary["feedback"]["fresh_rows"] == 0
    v2 = _publish(registry, tmp_path, data, "v2", data.summary, golden_accuracy=0.9)
    from tuneloop.store.quarantine import QuarantineBook

    QuarantineBook(registry.storage).release("m", "bbbbbbbb")
    nxt = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v2)
    # No watermark moved past them: they return as fresh rows, not also as released ones.
    assert nxt.summary["quarantine"]["released_rows"] == 0 and nxt.summary["feedback"]["fresh_rows"] == 25
    ids = nxt.train.column("feedback_id").to_pylist() + nxt.fresh_eval.column("feedback_id").to_pylist()
    assert len([i for i in ids if i]) == 25 == len({i for i in ids if i})


def test_a_jsonl_seed_may_write_labels_as_numbers_and_strings_in_one_file(tmp_path):
    from tuneloop.core.tasks import make_task

    path = tmp_path / "seed.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": "1"}\n{"text": "c", "label": true}\n')
    table = read_dataset(str(path), make_task("text-classification", ["0", "1", "true"]))
    assert table.column("label").to_pylist() == ["0", "1", "true"]
    # 1.0 reads as "1" either way, and a text may hold U+2028 unescaped (valid JSON).
    path.write_text('{"text": "a\u2028b", "label": 1.0}\n{"text": "c", "label": "0"}\r\n', encoding="utf-8")
    table = read_dataset(str(path), make_task("text-classification", ["0", "1"]))
    assert table.to_pylist() == [{"text": "a\u2028b", "label": "1"}, {"text": "c", "label": "0"}]


def test_a_jsonl_file_of_date_like_texts_is_read_as_written(tmp_path):
    """pyarrow reads a block whose values are all ISO dates as timestamps: the text
    "2024-01-01" trained as "2024-01-01 00:00:00", and a tagger's tokens failed the job."""
    from tuneloop.core.tasks import make_task

    path = tmp_path / "seed.jsonl"
    path.write_text('{"text": "2024-01-01", "label": "2024-05-06"}\n{"text": "2024-02-03", "label": "later"}\n')
    table = read_dataset(str(path), make_task("text-classification", ["2024-05-06", "later"]))
    assert table.to_pylist() == [{"text": "2024-01-01", "label": "2024-05-06"},
                                 {"text": "2024-02-03", "label": "later"}]
    assert read_texts(str(path)) == ["2024-01-01", "2024-02-03"]
    conll = tmp_path / "ner.jsonl"
    conll.write_text('{"tokens": ["2024-01-01", "2024-02-03"], "tags": ["O", "O"]}\n')
    assert read_dataset(str(conll), make_task("token-classification", ["PER"])).to_pylist() == [
        {"text": "2024-01-01 2024-02-03", "entities": []}]


def test_a_seed_files_labels_in_another_unicode_form_are_read_as_the_configured_ones(tmp_path):
    """Feedback matched "tre\u0300s bien" (a combining accent) to the config's "tr\u00e8s bien";
    a seed file that wrote it so was refused as outside the model's labels."""
    from tuneloop.core.tasks import make_task

    composed, decomposed = "tr\u00e8s bien", "tre\u0300s bien"
    tsv = tmp_path / "seed.tsv"
    tsv.write_text(f"text\tlabel\nfine\t{decomposed}\nbad\tpas bien\n", encoding="utf-8")
    table = read_dataset(str(tsv), make_task("text-classification", ["pas bien", composed]))
    assert table.column("label").to_pylist() == [composed, "pas bien"]
    multi = tmp_path / "multi.tsv"
    multi.write_text(f"text\tlabels\nfine\t{decomposed}|pas bien\n", encoding="utf-8")
    table = read_dataset(str(multi), make_task("multi-label-classification", ["pas bien", composed]))
    assert sorted(table.column("labels").to_pylist()[0]) == sorted(["pas bien", composed])
    ner, types = tmp_path / "ner.jsonl", ["PER", "CAF\u00c9"]
    ner.write_text(json.dumps({"text": "Luna bar", "entities": [{"start": 0, "end": 4, "label": "CAFE\u0301"}]}) + "\n"
                   + json.dumps({"tokens": ["Luna", "bar"], "tags": ["B-CAFE\u0301", "O"]}) + "\n", encoding="utf-8")
    table = read_dataset(str(ner), make_task("token-classification", types))
    assert [e["label"] for spans in table.column("entities").to_pylist() for e in spans] == ["CAF\u00c9"] * 2
    with pytest.raises(ValueError, match="bien!"):  # another text is still another label
        tsv.write_text("text\tlabel\nfine\tbien!\n", encoding="utf-8")
        read_dataset(str(tsv), make_task("text-classification", ["pas bien", composed]))


def test_a_dataset_with_a_column_twice_is_refused_naming_it(tmp_path):
    from tuneloop.core.tasks import make_task

    path = tmp_path / "seed.csv"
    path.write_text("text,label,label\nfine,positive,negative\n")
    with pytest.raises(ValueError, match=r"has the column\(s\) \['label'\] more than once"):
        read_dataset(str(path), make_task("text-classification", ["negative", "positive"]))


@pytest.mark.parametrize("labels", [
    ["positive"] * 50 + ["negative"] * 49 + ["neutral"],  # a class with one row
    ["positive", "negative"],  # a tiny seed: one row of each
    ["positive", "positive", "negative"],
])
def test_every_class_of_the_seed_keeps_a_row_to_train_on(tmp_path, labels):
    seed = tmp_path / "seed.tsv"
    seed.write_text("text\tlabel\n" + "".join(f"text {i}\t{label}\n" for i, label in enumerate(labels)))
    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["negative", "neutral", "positive"],
                                    "seed_dataset": str(seed)}],
                        "storage": {"root": str(tmp_path / "store")}, "training": {"golden_fraction": 0.9}})
    storage = Storage(cfg.storage.root)
    tasks = model_tasks(cfg.models)
    feedback = FeedbackStore(storage, str(tmp_path / "journal"), tasks)
    data = assemble(tasks["m"], cfg.model("m"), cfg.training, Registry(storage), feedback, None)
    assert set(data.train.column("label").to_pylist()) == set(labels)
    assert data.golden.num_rows == min(round(0.9 * len(labels)), len(labels) - len(set(labels)))


def _first_job(tmp_path, seed, labels: list[str], golden_fraction: float, task: str = "text-classification"):
    """The data of model m's first job on ``seed``, nothing else configured."""
    cfg = parse_config({"models": [{"name": "m", "task": task, "base_model": "x", "labels": labels,
                                    "seed_dataset": str(seed)}],
                        "storage": {"root": str(tmp_path / "store")}, "training": {"golden_fraction": golden_fraction}})
    storage = Storage(cfg.storage.root)
    tasks = model_tasks(cfg.models)
    return assemble(tasks["m"], cfg.model("m"), cfg.training, Registry(storage),
                    FeedbackStore(storage, str(tmp_path / "journal"), tasks), None)


@pytest.mark.parametrize("task_name", ["multi-label-classification", "token-classification"])
def test_a_label_seen_in_one_seed_row_keeps_it_to_train_on_for_every_task(tmp_path, task_name):
    """Only the seed's first row stayed out of the golden set for these tasks: a label (or
    entity type) in one row alone is a stratum of its own, sure to be picked, and was never
    trained by any version."""
    import json

    def row(i, labels):
        if task_name == "multi-label-classification":
            return {"text": f"text {i}", "labels": labels}
        return {"text": f"word{i} x", "entities": [{"start": 0, "end": len(f"word{i}"), "label": t} for t in labels]}
    rows = [row(i, ["a"]) for i in range(20)] + [row(20 + i, ["b"]) for i in range(20)] + \
        [row(40 + i, ["a", "b"][: 1 + i % 2]) for i in range(9)] + [row(49, ["c"])]
    if task_name == "token-classification":  # one entity a text: a second type on one word overlaps
        rows = [{**r, "entities": r["entities"][:1]} for r in rows]
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = _first_job(tmp_path, seed, ["a", "b", "c"], 0.5, task_name)
    column = "labels" if task_name == "multi-label-classification" else "entities"
    trained = {t if isinstance(t, str) else t["label"] for targets in data.train.column(column).to_pylist()
               for t in targets}
    assert trained == {"a", "b", "c"}
    assert data.golden.num_rows == 25


def test_a_class_whose_rows_repeat_one_text_keeps_it_to_train_on(tmp_path):
    """Golden texts leave training with every row that has them: a duplicate of the row
    kept for its class, picked for the golden set, took that class's last training row."""
    seed = tmp_path / "seed.tsv"
    rows = [(f"text {i}", "positive") for i in range(20)] + [("Call me back", "negative")] * 5
    seed.write_text("text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows))
    data = _first_job(tmp_path, seed, ["negative", "positive"], 0.5)
    assert data.train.column("label").to_pylist().count("negative") >= 1
    assert "Call me back" not in data.golden.column("text").to_pylist()
    assert len(set(data.golden.column("text").to_pylist())) == data.golden.num_rows == 12  # half the 25 rows


def test_a_golden_set_leaving_fewer_rows_than_workers_is_refused_before_it_is_frozen(tmp_path):
    seed = tmp_path / "seed.tsv"
    seed.write_text("text\tlabel\n" + "".join(f"text {i}\t{('negative', 'positive')[i % 2]}\n" for i in range(10)))
    doc = {"models": [{"name": "m", "base_model": "x", "labels": ["negative", "positive"], "seed_dataset": str(seed)}],
           "storage": {"root": str(tmp_path / "store")}, "training": {"golden_fraction": 0.9, "num_workers": 4}}
    cfg = parse_config(doc)
    storage = Storage(cfg.storage.root)
    tasks = model_tasks(cfg.models)
    feedback = FeedbackStore(storage, str(tmp_path / "journal"), tasks)
    with pytest.raises(ValueError, match=r"golden set of 8 of the seed's 10 rows \(golden_fraction 0.9\) leaves 2"):
        assemble(tasks["m"], cfg.model("m"), cfg.training, Registry(storage), feedback, None)
    assert Registry(storage).golden("m") is None  # nothing frozen: a lower golden_fraction takes effect
    lower = parse_config({**doc, "training": {"golden_fraction": 0.5, "num_workers": 4}})
    data = assemble(tasks["m"], lower.model("m"), lower.training, Registry(storage), feedback, None)
    assert data.golden.num_rows == 5


def test_a_jsonl_seed_whose_other_keys_change_type_is_read(tmp_path):
    from tuneloop.core.tasks import make_task

    path = tmp_path / "seed.jsonl"
    path.write_text('{"text": "a", "label": 0, "id": 1, "meta": {"src": "web"}}\n'
                    '{"text": "b", "label": "1", "id": "a2", "meta": "web"}\n')
    table = read_dataset(str(path), make_task("text-classification", ["0", "1"]))
    assert table.to_pylist() == [{"text": "a", "label": "0"}, {"text": "b", "label": "1"}]
    multi = tmp_path / "multi.jsonl"
    multi.write_text('{"text": "a", "labels": [0, 2]}\n{"text": "b", "labels": "1|2", "id": 3}\n'
                     '{"text": "c", "labels": [], "id": "x"}\n')
    table = read_dataset(str(multi), make_task("multi-label-classification", ["0", "1", "2"]))
    assert table.column("labels").to_pylist() == [["0", "2"], ["1", "2"], []]


def test_a_large_csv_whose_quoted_texts_hold_line_breaks_is_read(tmp_path):
    """As pandas or a spreadsheet export reviews: pyarrow read such a file in 1 MB blocks
    cut at line breaks, and failed it once it was over one block."""
    import csv

    from tuneloop.core.tasks import make_task

    path = tmp_path / "seed.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "label"])
        for i in range(30_000):
            writer.writerow([i, f"line one of review {i}, quoted\nline two", ["negative", "positive"][i % 2]])
    assert path.stat().st_size > 1 << 20  # pyarrow's block
    table = read_dataset(str(path), make_task("text-classification", ["negative", "positive"]))
    assert table.num_rows == 30_000 and table.column("text")[7].as_py() == "line one of review 7, quoted\nline two"


@pytest.mark.parametrize(("name", "content", "fragment"), [
    ("seed.tsv", 'text\tlabel\n"a\tquoted"\tpositive\nb\tnegative\n', "cannot be read as tsv: CSV parse error"),
    ("seed.csv", "text,label\na,positive\n \n", "cannot be read as csv: CSV parse error"),
    ("seed.jsonl", '{"text": "a", "label": "positive"}\n{"text": "b", "label": \n', "line 2: not JSON"),
    ("seed.jsonl", '{"text": "a", "label": "positive"}\n["b", "negative"]\n', "line 2: a row must be a JSON object"),
    # the file's line, blank lines counted: it said "line 1 column 13", the record's own
    ("seed.jsonl", '{"text": "a", "label": "positive"}\n\n\n{"text":"d" "label":"positive"}\n',
     "line 4: not JSON (Expecting ',' delimiter at column 13)"),
    ("seed.jsonl", '{"text": "a", "label": "positive"}\n\n[1]\n', "line 3: a row must be a JSON object"),
    ("seed.parquet", "not parquet", "cannot be read as parquet"),
])
def test_a_file_that_cannot_be_parsed_is_named_in_the_error(tmp_path, name, content, fragment):
    from tuneloop.core.tasks import make_task

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        read_dataset(str(path), make_task("text-classification", ["negative", "positive"]))
    assert str(path) in str(e.value) and fragment in str(e.value)


def test_a_golden_dataset_set_later_keeps_its_texts_out_of_replay(env):
    cfg, task, registry, feedback, tmp_path = env
    first = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary)
    _give(feedback, 20)
    second = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v1)
    v2 = _publish(registry, tmp_path, second, "v2", second.summary)
    assert "feedback 3" in second.reservoir.column("text").to_pylist()
    golden = tmp_path / "golden.tsv"
    golden.write_text("text\tlabel\nfeedback 3\tpositive\nseed text 1\tpositive\n")
    later = cfg.model("m").model_copy(update={"golden_dataset": str(golden)})
    everything = cfg.training.model_copy(update={"replay_ratio": 1000.0})  # the whole replay pool
    third = assemble(task, later, everything, registry, feedback, v2)
    assert third.summary["replay"]["rows"] == third.summary["replay"]["pool_rows"]
    assert third.golden.num_rows == 2
    assert {"feedback 3", "seed text 1"}.isdisjoint(third.train.column("text").to_pylist())
    # The sample frozen at v1 stays out of training too: without the file it judges again.
    sample = set(registry.golden("m").column("text").to_pylist())
    assert sample and sample.isdisjoint(third.train.column("text").to_pylist())


def test_a_seed_too_small_once_early_stopping_takes_its_share_is_refused_before_a_golden_set_is_frozen(env):
    cfg, task, registry, feedback, tmp_path = env
    seed = tmp_path / "small.tsv"
    seed.write_text("text\tlabel\n" + "".join(f"t{i}\t{'positive' if i % 2 else 'negative'}\n" for i in range(12)))
    small = cfg.model("m").model_copy(update={"seed_dataset": str(seed)})
    watching = cfg.training.model_copy(update={"num_workers": 8, "early_stopping_patience": 2, "epochs": 3})
    # 12 rows: 2 golden leave 10, of which 2 watch early stopping: 8 train, enough for 8 workers...
    assert assemble(task, small, watching, Registry(registry.storage), feedback, None).train.num_rows >= 8
    fresh_root = Registry(type(registry.storage)(str(tmp_path / "other")))
    nine = watching.model_copy(update={"num_workers": 9})  # ...not for 9: refused, and nothing frozen
    with pytest.raises(ValueError, match=r"leaves 8 to train on \(2 more watch early stopping\), fewer than "
                                         r"training.num_workers 9"):
        assemble(task, small, nine, fresh_root, feedback, None)
    assert fresh_root.golden("m") is None


def test_the_first_jobs_feedback_counts_among_the_rows_a_golden_set_leaves(env):
    cfg, task, registry, feedback, tmp_path = env
    tight = cfg.training.model_copy(update={"golden_fraction": 0.9, "num_workers": 12})
    _give(feedback, 5)  # 100 seed rows, 90 golden: 10 seed rows and 5 feedback rows train, >= 12 workers
    data = assemble(task, cfg.model("m"), tight, registry, feedback, None)
    assert data.golden.num_rows == 90 and data.train.num_rows >= 12


def test_repeated_feedback_and_answers_on_seed_texts_are_counted_as_the_job_trains_them(env):
    """Counted raw, two answers on one seed text counted as two more rows: the golden set was
    frozen, and the job then failed with fewer training rows than workers."""
    cfg, task, registry, feedback, tmp_path = env
    seed = tmp_path / "four.tsv"
    seed.write_text("text\tlabel\na1\tnegative\na2\tnegative\nb1\tpositive\nb2\tpositive\n")
    four = cfg.model("m").model_copy(update={"seed_dataset": str(seed)})
    tcfg = cfg.training.model_copy(update={"num_workers": 4, "golden_fraction": 0.25})
    feedback.append(model="m", text="b1", label="negative")
    feedback.append(model="m", text="B1 ", label="positive")
    feedback.compact()
    # 4 seed rows, 1 golden: a1/a2/b1/b2 less it, less b1 (answered), plus 1 answer: 3 rows
    with pytest.raises(ValueError, match=r"leaves 3 to train on, fewer than training.num_workers 4"):
        assemble(task, four, tcfg, registry, feedback, None)
    assert registry.golden("m") is None  # refused before it was frozen
    three = tcfg.model_copy(update={"num_workers": 3})
    assert assemble(task, four, three, registry, feedback, None).train.num_rows == 3


def test_the_labels_a_golden_set_lacks_are_named_for_every_task():
    from tuneloop.core.tasks import make_task
    from tuneloop.training.job_data import golden_labels_missing

    text = make_task("text-classification", ["a", "b", "c"])
    assert golden_labels_missing(text, pa.table({"text": ["x", "y"], "label": ["a", "a"]})) == ["b", "c"]
    multi = make_task("multi-label-classification", ["a", "b", "c"])
    assert golden_labels_missing(multi, pa.table({"text": ["x", "y"], "labels": [["a"], ["c", "a"]]})) == ["b"]
    ner = make_task("token-classification", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    entities = pa.array([[], [{"start": 0, "end": 3, "label": "LOC"}]],
                        pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32()), ("label", pa.string())])))
    assert golden_labels_missing(ner, pa.table({"text": ["x", "Rome"], "entities": entities})) == ["PER"]
    assert golden_labels_missing(ner, pa.table({"text": ["x"], "entities": entities[:1]})) == ["LOC", "PER"]


def test_a_lone_key_is_judged_against_production_exact_answers_not_its_f1(tmp_path):
    """Multi-label production at golden F1 0.9 answers only 30% of texts exactly right (its
    accuracy). A lone key agreeing exactly on 40% of its predictions is as honest as that;
    judged against the F1 (allowed gap 0.4), its feedback would have been held."""
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(f'{{"text": "seed {i}", "labels": ["a"]}}\n' for i in range(40)))
    cfg = parse_config({"models": [{"name": "m", "task": "multi-label-classification", "base_model": "x",
                                    "labels": ["a", "b", "c"], "seed_dataset": str(seed)}],
                        "storage": {"root": str(tmp_path / "store")}})
    storage = Storage(cfg.storage.root)
    tasks = model_tasks(cfg.models)
    feedback = FeedbackStore(storage, str(tmp_path / "journal"), tasks)
    feedback.open_writer()
    registry = Registry(storage)
    weights = tmp_path / "weights"
    weights.mkdir()
    metrics = EvalMetrics(accuracy=0.3, precision=0.9, recall=0.9, f1=0.9, eval_rows=20)
    v1 = registry.publish("m", str(weights), Manifest(
        version="pending", model="m", parent=None, base_model="x", task="multi-label-classification",
        labels=["a", "b", "c"], data={}, metrics=metrics))
    for i in range(40):
        feedback.append(model="m", text=f"t {i}", labels=["a", "b"] if i % 5 < 2 else ["a"], key_id="aaaaaaaa",
                        prediction_id=f"{i:032x}", version="v1", predicted_labels=["a", "b"])
    feedback.compact()
    data = assemble(tasks["m"], cfg.model("m"), cfg.training, registry, feedback, v1)
    feedback.close()
    q = data.summary["quarantine"]
    assert q["keys"]["aaaaaaaa"]["production_agreement"] == 0.4
    assert q["flagged"] == {} and data.held.num_rows == 0


def test_a_golden_set_holding_the_whole_seed_is_named_as_the_reason_nothing_trains(env):
    cfg, task, registry, feedback, tmp_path = env
    same = cfg.model("m").model_copy(update={"golden_dataset": cfg.model("m").seed_dataset})
    with pytest.raises(ValueError, match="every row of its seed dataset is in its golden set"):
        assemble(task, same, cfg.training, registry, feedback, None)


def test_a_golden_dataset_taken_out_later_leaves_no_golden_set_rather_than_one_of_trained_rows(env, caplog):
    """A sample of the seed frozen at a later job held rows production had trained on: the
    candidate was compared with a model that had seen its golden answers."""
    cfg, task, registry, feedback, tmp_path = env
    golden = tmp_path / "golden.tsv"
    golden.write_text("text\tlabel\nkept apart\tpositive\nalso apart\tnegative\n")
    first = assemble(task, cfg.model("m").model_copy(update={"golden_dataset": str(golden)}), cfg.training,
                     registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary)
    _give(feedback, 20)
    second = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v1)  # golden_dataset gone
    assert second.golden.num_rows == 0 and registry.golden("m") is None
    assert "give the model a golden_dataset" in caplog.text


def _v1_and_a_second_writer(env) -> tuple[Manifest, FeedbackStore]:
    """v1 published, 20 fresh records compacted, and a second ingress journaling beside the first."""
    cfg, task, registry, feedback, tmp_path = env
    first = assemble(task, cfg.model("m"), cfg.training, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary)
    _give(feedback, 20)
    other = FeedbackStore(registry.storage, str(tmp_path / "journal"), feedback.tasks)
    other.open_writer()
    return v1, other


def test_records_another_live_writer_has_not_compacted_hold_the_watermark_back(env):
    """During an upgrade two ingresses journal side by side; a job compacts one. The other's
    records, older than the newest compacted one, fell behind the job's watermark and no later
    job read them: acknowledged feedback never trained on."""
    import time

    cfg, task, registry, feedback, tmp_path = env
    v1, other = _v1_and_a_second_writer(env)
    late = [other.append(model="m", text=f"other writer {i}", label="negative") for i in range(5)]
    time.sleep(0.01)
    _give(feedback, 30, start=20)  # newer, and compacted: the newest rows in Parquet
    data = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v1)
    fb = data.summary["feedback"]
    assert (fb["fresh_rows"], fb["waiting_for_compaction"]) == (20, 30)
    other.close()  # compacts its records
    v2 = _publish(registry, tmp_path, data, "v2", data.summary)
    nxt = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v2)
    seen = {*nxt.train.column("feedback_id").to_pylist(), *nxt.fresh_eval.column("feedback_id").to_pylist()}
    assert set(late) <= seen and nxt.summary["feedback"]["waiting_for_compaction"] == 0
    assert nxt.summary["feedback"]["fresh_rows"] == 4 + 5 + 30  # v1's kept back, the other's, the waiting ones


def test_a_record_another_writer_journals_while_the_job_reads_holds_the_watermark_back(env, monkeypatch):
    """Both journals empty at the job's first look; then one writer journals a record and the
    other a newer one, compacted before the read: the job saw the newer alone, and its
    watermark passed the older for good."""
    import time

    cfg, task, registry, feedback, tmp_path = env
    v1, other = _v1_and_a_second_writer(env)
    late, read_since = [], feedback.read_since

    def read_while_both_write(model, after):
        late.append(other.append(model="m", text="other writer", label="negative"))  # journaled only
        time.sleep(0.01)
        _give(feedback, 5, start=20)  # newer, and compacted before the read lists the files
        return read_since(model, after)

    monkeypatch.setattr(feedback, "read_since", read_while_both_write)
    data = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v1)
    monkeypatch.setattr(feedback, "read_since", read_since)
    assert (data.summary["feedback"]["fresh_rows"], data.summary["feedback"]["waiting_for_compaction"]) == (20, 5)
    other.close()  # compacts its record
    v2 = _publish(registry, tmp_path, data, "v2", data.summary)
    nxt = assemble(task, cfg.model("m"), cfg.training, registry, feedback, v2)
    seen = {*nxt.train.column("feedback_id").to_pylist(), *nxt.fresh_eval.column("feedback_id").to_pylist()}
    assert set(late) <= seen


def test_a_golden_dataset_edited_between_jobs_is_warned_about_and_judges_on_the_new_file(env, caplog):
    """The gate compares the two versions on today's file; an operator reading why a version
    passed or failed must know the yardstick moved since production was judged."""
    cfg, task, registry, feedback, tmp_path = env
    golden = tmp_path / "golden.tsv"
    golden.write_text("text\tlabel\nkept apart\tpositive\nalso apart\tnegative\n")
    judged = cfg.model("m").model_copy(update={"golden_dataset": str(golden)})
    first = assemble(task, judged, cfg.training, registry, feedback, None)
    v1 = _publish(registry, tmp_path, first, "v1", first.summary)
    _give(feedback, 20)
    assemble(task, judged, cfg.training, registry, feedback, v1)
    assert "changed since production was judged" not in caplog.text  # the same file: no warning
    golden.write_text("text\tlabel\nkept apart\tpositive\nalso apart\tnegative\na third\tpositive\n")
    third = assemble(task, judged, cfg.training, registry, feedback, v1)
    assert "golden_dataset " + str(golden) + " changed since production was judged" in caplog.text
    assert third.golden.num_rows == 3


def test_seed_rows_with_no_visible_text_are_left_out_and_said(tmp_path, caplog):
    """Trained on as they were, while feedback refuses the same texts with a 422. Left out, not
    refused: a seed that trained before (a CoNLL file's empty sentences) still does."""
    path = tmp_path / "seed.tsv"
    path.write_text("text\tlabel\ngood film\tpositive\n   \tnegative\n\x00\tpositive\nbad film\tnegative\n")
    with caplog.at_level("WARNING"):
        table = read_dataset(str(path), make_task("text-classification", ["negative", "positive"]))
    assert table.column("text").to_pylist() == ["good film", "bad film"]
    assert any("2 row(s) with no visible text (the first: row 2) left out" in r.getMessage() for r in caplog.records)
    conll = tmp_path / "ner.jsonl"
    conll.write_text('{"tokens": ["Kofi", "Annan"], "tags": ["B-PER", "I-PER"]}\n{"tokens": [], "tags": []}\n')
    ner = read_dataset(str(conll), make_task("token-classification", ["PER"]))
    assert ner.column("text").to_pylist() == ["Kofi Annan"]


def test_a_student_of_one_class_of_labelled_rows_is_said_not_refused(caplog):
    """It learns every class from its teacher's soft labels (transfer texts too), and its gate
    compares it with the teacher."""
    from tuneloop.training.job_data import _check_first_labels

    cfg = parse_config({"models": [{"name": "t", "base_model": "x", "labels": ["negative", "positive"]},
                                   {"name": "s", "base_model": "x", "labels": ["negative", "positive"],
                                    "distill": {"teacher": "t"}}]})
    task = make_task("text-classification", ["negative", "positive"])
    one_class = pa.table({"text": ["a", "b"], "label": ["positive", "positive"]})
    with caplog.at_level("WARNING"):
        _check_first_labels(task, cfg.model("s"), one_class)
    assert any("trains on no row of ['negative']" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="alone"):
        _check_first_labels(task, cfg.model("t"), one_class)


def test_a_golden_file_without_a_label_is_said_as_a_frozen_sample_without_one_is(tmp_path, caplog):
    """A golden_dataset of positive rows alone passed unnoticed, and the gate cannot see a
    version lose the negative class there."""
    from tuneloop.training.job_data import golden_set

    golden = tmp_path / "golden.tsv"
    golden.write_text("text\tlabel\n" + "".join(f"good {i}\tpositive\n" for i in range(10)))
    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["negative", "positive"],
                                    "golden_dataset": str(golden)}], "storage": {"root": str(tmp_path / "store")}})
    with caplog.at_level("WARNING", logger="tuneloop.training.job_data"):
        table, _ = golden_set(model_tasks(cfg.models)["m"], cfg.model("m"), cfg.training,
                              Registry(Storage(cfg.storage.root)), None)
    assert table.num_rows == 10
    assert f"the golden set {golden} (golden_dataset) has no row of ['negative']" in caplog.text


def test_a_text_labelled_two_ways_in_a_seed_is_warned_of(tmp_path, caplog):
    """It trained under both labels without a word."""
    seed = tmp_path / "seed.tsv"
    seed.write_text("text\tlabel\ngood\tpositive\ngood\tnegative\nbad\tnegative\nbad\tnegative\n")
    task = make_task("text-classification", ["negative", "positive"])
    with caplog.at_level("WARNING", logger="tuneloop.training.data"):
        assert read_dataset(str(seed), task).num_rows == 4  # read as given
    assert "1 text(s) come with more than one label (the first: 'good')" in caplog.text  # not "bad": the same twice

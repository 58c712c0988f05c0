"""A real Ray Train job: 2 workers, DeepSpeed (ZeRO-2, then ZeRO-3) on CPU with gloo,
data from the object store, export to the registry, gate, promotion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.core.tasks import model_tasks
from tuneloop.store.jobs import JobStore
from tuneloop.store.feedback_store import FeedbackStore
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage
from tests.integration.conftest import make_config


@pytest.fixture(scope="module")
def trained(ray_session, tiny_model, seed_tsv, tmp_path_factory):
    from tuneloop.training.launcher import run_training

    root = tmp_path_factory.mktemp("train-store")
    cfg = make_config(root, tiny_model, seed_tsv, training={"max_steps": 2, "zero_stage": 2})
    first = run_training(cfg, "sentiment")
    feedback = FeedbackStore(Storage(cfg.storage.root), cfg.storage.journal_path(), model_tasks(cfg.models))
    feedback.open_writer()
    for i in range(3):  # six texts: answers on one text are the newest alone (test_job_data.py)
        for text, label in [(f"the film was a joy {i}", "positive"), (f"the film was a chore {i}", "negative")]:
            feedback.append(model="sentiment", text=text, label=label)
    # Two answers on one prediction: only the later one is trained on.
    feedback.append(model="sentiment", text="the film was fine", label="negative", prediction_id="p" * 32,
                    version="v1", predicted_label="positive")
    feedback.append(model="sentiment", text="the film was fine", label="positive", prediction_id="p" * 32,
                    version="v1", predicted_label="positive")
    feedback.close()  # compacts: training reads the Parquet
    cfg3 = make_config(root, tiny_model, seed_tsv, training={"max_steps": 2, "zero_stage": 3})
    second = run_training(cfg3, "sentiment", trigger="manual")
    return {"root": root, "first": first, "second": second, "registry": Registry(Storage(str(root)))}


def test_first_job_trains_v1_from_the_base_model(trained):
    job, manifest = trained["first"].job, trained["first"].manifest
    assert job.state == "succeeded", job.error
    assert manifest.version == "v1" and manifest.parent is None and manifest.status == "accepted"
    assert manifest.training["zero_stage"] == 2 and manifest.training["steps"] == 2
    assert manifest.training["gpus_per_worker"] == 0  # a CPU job held no GPU, whatever the default says
    speed = manifest.training["speed"]  # the start-up, whole and at the worker's marks
    assert set(speed["startup_parts"]) == {"workers", "model_load", "deepspeed", "first_batch"}
    assert all(s >= 0 for s in speed["startup_parts"].values()) and speed["startup_parts"]["workers"] > 0
    assert speed["startup_s"] == pytest.approx(sum(speed["startup_parts"].values()), abs=0.02)
    data = manifest.data
    assert data["seed"]["sha256"] and data["feedback"]["fresh_rows"] == 0
    # The seed less its frozen golden set (20%, stratified) is what v1 learns.
    assert (data["train_rows"], data["golden"]["rows"], data["eval_rows"]) == (64, 16, 16)
    assert manifest.metrics.eval_rows == 16 and set(manifest.metrics.per_class) == {"negative", "positive"}
    # The rows it was judged on lie beside it: the optimizer's parity check reads them.
    assert trained["registry"].table("sentiment", "v1", "golden").equals(trained["registry"].golden("sentiment"))
    for key in ("accuracy", "precision", "recall", "f1"):
        assert 0.0 <= getattr(manifest.metrics, key) <= 1.0
    assert [c.name for c in manifest.gate.checks] == ["golden", "fresh", "sanity"]
    first_promotion = trained["registry"].state("sentiment").history[0]
    assert (first_promotion.production, first_promotion.event) == ("v1", "promote")


def test_second_job_starts_from_production_with_feedback_and_zero3(trained):
    job, manifest = trained["second"].job, trained["second"].manifest
    assert job.state in ("succeeded", "rejected"), job.error
    assert manifest.version == "v2" and manifest.parent == "v1"
    assert manifest.training["zero_stage"] == 3
    # 8 records; the older of two answers on one prediction is left out: 7 fresh, the newest
    # one kept back for the gate, 6 trained on beside as many replayed seed rows.
    fb = manifest.data["feedback"]
    assert (fb["fresh_rows"], fb["superseded"], fb["trained_rows"], fb["kept_back_rows"]) == (7, 1, 6, 1)
    assert manifest.data["train_rows"] == 12 and manifest.data["replay"]["rows"] == 6
    trained_on = trained["registry"].table("sentiment", "v2", "trained_on").to_pylist()
    assert sorted(r["source"] for r in trained_on) == ["feedback"] * 6 + ["seed"] * 6
    assert trained["registry"].table("sentiment", "v2", "reservoir").num_rows == 6
    # Candidate and production were scored on the same golden and fresh rows in the same job.
    assert manifest.parent_metrics is not None
    assert manifest.parent_metrics.eval_rows == manifest.metrics.eval_rows == 16
    checks = {c.name: c for c in manifest.gate.checks}
    assert checks["fresh"].numbers["rows"] == 1 and "p_value" not in checks["fresh"].numbers  # too few for the test
    expected = "accepted" if all(c.passed for c in checks.values()) else "rejected"
    assert manifest.status == expected and manifest.gate.accepted == (expected == "accepted")
    production = trained["registry"].production("sentiment")
    assert production == ("v2" if expected == "accepted" else "v1")


def test_exported_checkpoint_is_a_consolidated_hf_model(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = trained["registry"].local_path("sentiment", "v2")  # trained under ZeRO-3
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    out = model(**tokenizer(["a test"], return_tensors="pt")).logits
    assert out.shape == (1, 2)
    manifest = json.loads((trained["root"] / "registry/sentiment/v2/manifest.json").read_text())
    assert manifest["job_id"] == trained["second"].job.job_id


def test_job_records(trained):
    jobs = JobStore(Storage(str(trained["root"])))
    records = {j.job_id: j for j in jobs.all()}
    first = records[trained["first"].job.job_id]
    assert first.state == "succeeded" and first.version == "v1" and first.finished_at


def test_recipe_freezes_accumulates_and_watches_epochs(trained, tiny_model, seed_tsv):
    """A third job with the transfer-learning knobs on: the frozen embeddings and lowest
    layer come out bit for bit as production had them, the rest trains, and the manifest
    says what the recipe did."""
    from safetensors.torch import load_file

    from tuneloop.training.launcher import run_training

    root, registry = trained["root"], trained["registry"]
    cfg = make_config(root, tiny_model, seed_tsv, training={
        "epochs": 3, "zero_stage": 2, "freeze_layers": 1, "gradient_accumulation_steps": 2, "dropout": 0.2,
        "early_stopping_patience": 1, "batch_size": 2, "learning_rate": 1e-3})
    feedback = FeedbackStore(Storage(cfg.storage.root), cfg.storage.journal_path(), model_tasks(cfg.models))
    feedback.open_writer()
    for i in range(12):
        feedback.append(model="sentiment", text=f"review {i} was {'great' if i % 2 else 'awful'}",
                        label="positive" if i % 2 else "negative")
    feedback.close()
    parent = registry.production("sentiment")
    outcome = run_training(cfg, "sentiment")
    assert outcome.job.state in ("succeeded", "rejected"), outcome.job.error
    recipe = outcome.manifest.training
    assert recipe["precision"] == "fp32" and recipe["accumulation"] == 2 and recipe["monitor"] == "validation"
    assert recipe["frozen_tensors"] == 5 + 16  # 3 embedding tables and their LayerNorm (2), layer 0's 16
    assert 1 <= recipe["best_epoch"] <= recipe["epochs_run"] <= 3
    if recipe["early_stopped"]:
        assert recipe["epochs_run"] - recipe["best_epoch"] == 1  # patience 1
    before = load_file(f"{registry.local_path('sentiment', parent)}/model.safetensors")
    after = load_file(f"{registry.local_path('sentiment', outcome.manifest.version)}/model.safetensors")
    frozen = [k for k in before if k.startswith("bert.embeddings.") or k.startswith("bert.encoder.layer.0.")]
    assert frozen and all(before[k].equal(after[k]) for k in frozen)
    # Epoch 1 takes 2 optimizer steps (its first at warmup's learning rate 0): the head moved.
    assert not after["classifier.weight"].equal(before["classifier.weight"])
    assert all(t.dtype.is_floating_point is False or str(t.dtype) == "torch.float32" for t in after.values())
    config = json.loads((root / "registry/sentiment" / outcome.manifest.version / "config.json").read_text())
    assert config["hidden_dropout_prob"] == 0.2 and config["dtype"] == "float32"


def test_a_student_distils_from_the_teachers_production_and_is_gated_against_it(trained, tiny_model, seed_tsv):
    """A 1-layer student cut from the teacher's production, trained on its soft labels over
    the teacher's seed, judged on the teacher's golden set; its lineage names the teacher."""
    import transformers

    from tuneloop.control.lineage import describe, version_lineage
    from tuneloop.training.launcher import run_training

    registry = trained["registry"]
    teacher_version = registry.production("sentiment")
    student = {"name": "small", "labels": ["negative", "positive"],
               "distill": {"teacher": "sentiment", "student_layers": 1, "max_gap": 1.0}}
    cfg = make_config(trained["root"], tiny_model, seed_tsv, training={"max_steps": 2, "num_workers": 1})
    cfg = cfg.model_copy(update={"models": [*cfg.models, cfg.models[0].model_validate(student)]})
    outcome = run_training(cfg, "small")
    job, manifest = outcome.job, outcome.manifest
    assert job.state == "succeeded", job.error
    assert manifest.distilled_from["model"] == "sentiment" and manifest.distilled_from["version"] == teacher_version
    assert manifest.distilled_from["student_layers"] == 1 and manifest.distilled_from["scoring_s"] > 0
    assert manifest.distilled_from["scoring_dtype"] == "fp32"  # the teacher has no artifacts here
    teacher_metrics = registry.manifest("sentiment", teacher_version).metrics
    assert manifest.distilled_from["teacher_metrics"]["accuracy"] == teacher_metrics.accuracy
    # The teacher's frozen golden set (16 rows), none of this model's own; its seed's other 64 rows.
    assert manifest.data["golden"]["model"] == "sentiment" and manifest.metrics.eval_rows == 16
    assert registry.golden("small") is None and manifest.data["train_rows"] == 64
    assert registry.table("small", "v1", "golden").equals(registry.golden("sentiment"))
    checks = {c.name: c for c in manifest.gate.checks}
    assert checks["teacher"].passed and checks["teacher"].numbers["teacher"] == f"sentiment {teacher_version}"
    assert registry.production("small") == "v1"
    config = transformers.AutoConfig.from_pretrained(registry.local_path("small", "v1"))
    assert config.num_hidden_layers == 1  # the teacher has 2
    shown = "\n".join(describe(version_lineage(registry, "small", "v1")))
    assert f"distilled from sentiment {teacher_version}" in shown and "temperature 2, alpha 0.5" in shown

    # A student of a teacher without a production version fails at once, saying so.
    orphan = {**student, "name": "orphan", "distill": {"teacher": "untrained", "student_layers": 1}}
    untrained = {"name": "untrained", "base_model": tiny_model, "labels": ["negative", "positive"]}
    cfg = cfg.model_copy(update={"models": [*cfg.models, *(cfg.models[0].model_validate(m) for m in (untrained, orphan))]})
    failed = run_training(cfg, "orphan").job
    assert failed.state == "failed" and "untrained, which has no production version yet" in failed.error


def test_a_student_of_another_family_and_vocabulary_learns_from_the_teacher(trained, tiny_model, seed_tsv,
                                                                             tmp_path):
    """The issue's student: a pretrained model of its own (here a RoBERTa with a 20-word
    vocabulary, not the teacher's BERT with MiniLM's 30,522 tokens), not the teacher's layers. The
    teacher scores the texts with its own tokenizer; the student reads them with its own. It
    also learns from a transfer set, texts without labels that only the teacher labels."""
    import transformers
    from safetensors.torch import load_file

    from tests.tiny_models import build_tiny_model
    from tuneloop.training.launcher import run_training

    texts = [line.split("\t")[0] for line in Path(seed_tsv).read_text().splitlines()[1:]]
    words = sorted({w for t in texts for w in t.split()})
    base = build_tiny_model(tmp_path / "own-vocab", ["negative", "positive"], family="roberta", words=words)
    registry = trained["registry"]
    transfer = tmp_path / "unlabelled.jsonl"
    transfer.write_text("".join(json.dumps({"text": f"{a} {b}"}) + "\n" for a, b in zip(words, reversed(words))))
    student = {"name": "own", "base_model": base, "labels": ["negative", "positive"],
               "distill": {"teacher": "sentiment", "max_gap": 1.0, "transfer_dataset": str(transfer),
                           "transfer_rows_per_job": 12}}
    cfg = make_config(trained["root"], tiny_model, seed_tsv, training={"max_steps": 2, "num_workers": 1})
    cfg = cfg.model_copy(update={"models": [*cfg.models, cfg.models[0].model_validate(student)]})
    outcome = run_training(cfg, "own")
    assert outcome.job.state == "succeeded", outcome.job.error
    manifest = outcome.manifest
    assert manifest.distilled_from["version"] == registry.production("sentiment")
    assert manifest.distilled_from["student_layers"] is None and manifest.distilled_from["scoring_s"] > 0
    assert manifest.metrics.eval_rows == 16  # the teacher's golden set
    assert manifest.data["transfer"]["rows"] == 12 and manifest.data["train_rows"] == 64 + 12
    trained_on = registry.table("own", manifest.version, "trained_on").to_pylist()
    assert sum(r["source"] == "transfer" and r["label"] is None for r in trained_on) == 12
    stored = registry.local_path("own", manifest.version)
    assert transformers.AutoConfig.from_pretrained(stored).model_type == "roberta"
    assert transformers.AutoTokenizer.from_pretrained(stored).vocab_size == len(words) + 5  # its own, kept
    before, after = load_file(f"{base}/model.safetensors"), load_file(f"{stored}/model.safetensors")
    assert not after["classifier.out_proj.weight"].equal(before["classifier.out_proj.weight"])


def test_the_teacher_scores_longest_texts_first_and_hands_rows_back_in_the_jobs_order(ray_session, tiny_model):
    """Scored sorted by length (little padding), the rows come back in the order the job
    made, each with its own logits (those of the text scored alone), and no helper column."""
    import random

    import numpy as np
    import pyarrow as pa

    from tuneloop.core.config import DistillConfig
    from tuneloop.core.tasks import make_task
    from tuneloop.training.distill import TEACHER_COLUMN, Teacher, _TeacherScorer, with_teacher_logits
    from tuneloop.training.model_files import ModelFiles

    rng = random.Random(3)
    words = ["good", "bad", "film", "plot", "the", "was"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) + f" {i}" for i in range(150)]
    table = pa.table({"text": texts, "label_id": [i % 2 for i in range(150)]})
    teacher = Teacher(model="sentiment", version="v1", files=ModelFiles(base_model=tiny_model), metrics=None,
                      settings=DistillConfig(teacher="sentiment"))
    task = make_task("text-classification", ["negative", "positive"])
    scored = with_teacher_logits(table, teacher, task, 64, use_gpu=False, cpus=1, gpus=0)
    assert scored.column_names == ["text", "label_id", TEACHER_COLUMN]
    assert scored.column("text").to_pylist() == texts and scored.column("label_id").equals(table.column("label_id"))
    scorer = _TeacherScorer({"base_model": tiny_model}, task.auto_class, task.head_labels(), 64, use_gpu=False)
    alone = [scorer(pa.table({"text": [t]}))[TEACHER_COLUMN].to_pylist()[0] for t in texts]
    assert np.allclose(np.array(scored.column(TEACHER_COLUMN).to_pylist()), np.array(alone), atol=1e-4)
    assert teacher.scoring_dtype == "fp32" and teacher.scoring_s > 0  # no bf16 parity on record


def test_failed_job_is_recorded_not_raised(ray_session, tiny_model, tmp_path):
    from tuneloop.training.launcher import run_training

    bad_seed = tmp_path / "bad.tsv"
    bad_seed.write_text("text\tlabel\ngreat\tpositive\nawful\tneutral\n")
    cfg = make_config(tmp_path / "store", tiny_model, str(bad_seed), training={"max_steps": 1})
    outcome = run_training(cfg, "sentiment")
    assert outcome.job.state == "failed" and outcome.manifest is None
    assert "neutral" in outcome.job.error
    assert Registry(Storage(cfg.storage.root)).versions("sentiment") == []


def test_a_label_added_keeps_productions_rows_and_its_baseline_is_productions_own_answers(trained, tiny_model,
                                                                                             seed_tsv, tmp_path):
    """The new head took random rows for every label, and production's baseline (which the
    gate compares the candidate with) was scored on them: noise, not production. Run last:
    it moves the module's production."""
    from tuneloop.training.launcher import run_training

    registry = trained["registry"]
    production = registry.production("sentiment")
    seed = tmp_path / "seed3.tsv"
    seed.write_text(open(seed_tsv).read() + "".join(f"the {t} was so-so\tneutral\n" for t in ("film", "meal", "book")))
    cfg = make_config(trained["root"], tiny_model, str(seed), model={"labels": ["negative", "neutral", "positive"]},
                      training={"max_steps": 2, "zero_stage": 2})
    outcome = run_training(cfg, "sentiment", trigger="manual")
    assert outcome.job.state in ("succeeded", "rejected"), outcome.job.error
    # The frozen golden set, scored as production answers it: what its own job recorded,
    # and never the label production lacks (the confusion's columns: negative, neutral, positive).
    parent, recorded = outcome.manifest.parent_metrics, registry.manifest("sentiment", production).metrics
    assert parent.eval_rows == 16 and parent.accuracy == recorded.accuracy
    assert [row[1] for row in parent.confusion] == [0, 0, 0]
    assert [[parent.confusion[i][j] for j in (0, 2)] for i in (0, 2)] == recorded.confusion


def test_a_job_marked_lost_while_it_trains_stops_its_workers(ray_session, tiny_model, seed_tsv, tmp_path, monkeypatch):
    """Its heartbeats stalled and the controller marked it lost (the model's next job may be
    waiting for its GPUs): it trained to its end, to be refused only at publishing."""
    import threading
    import time

    from tuneloop.training import launcher

    monkeypatch.setattr(launcher, "HEARTBEAT_EVERY_S", 0.5)  # the workers' check, every half second here
    cfg = make_config(tmp_path / "store", tiny_model, seed_tsv,
                      training={"epochs": 1000, "num_workers": 1, "early_stopping_patience": None})
    jobs = JobStore(Storage(cfg.storage.root))
    job = jobs.create("sentiment", "manual")
    outcome = []
    started = time.monotonic()
    runner = threading.Thread(target=lambda: outcome.append(launcher.run_training(cfg, "sentiment", job=job)))
    runner.start()
    run_folder = Path(cfg.storage.root) / "train_runs" / f"sentiment-{job.job_id}"
    while not run_folder.exists() and time.monotonic() - started < 120:  # the run started: past the driver's checks
        time.sleep(0.2)
    assert run_folder.exists()  # else the driver's own check would stop it, not the workers'
    jobs.fail_running(job, "lost: no heartbeat (marked by the test)")
    runner.join(timeout=120)  # a thousand epochs would take many minutes
    assert not runner.is_alive()
    done = outcome[0].job
    assert done.state == "failed" and done.error.startswith("JobLost: job ") and "while it ran" in done.error
    assert outcome[0].manifest is None and Registry(Storage(cfg.storage.root)).versions("sentiment") == []

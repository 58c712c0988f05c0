"""Distillation's pure parts and its torch pieces on a tiny model: the config a student
needs, which teacher layers a student keeps, the gate's teacher check, the loss, and a
student's data (the teacher's golden set and seed). No Ray."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tuneloop.core.config import ConfigError, parse_config
from tuneloop.core.config import GateConfig
from tuneloop.core.evaluation import classification_metrics
from tuneloop.core.gate import Evidence, TeacherEvidence, decide
from tuneloop.core.tasks import make_task, model_tasks
from tuneloop.store.feedback_store import FeedbackStore
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage
from tuneloop.training.job_data import assemble
from tuneloop.training.recipe import student_layers

LABELS = ["negative", "positive"]
TEACHER = {"name": "big", "base_model": "x", "labels": LABELS}


def _cfg(student: dict, teacher: dict = TEACHER, **top):
    return parse_config({"models": [teacher, {"name": "small", "labels": LABELS, **student}], **top})


def test_a_student_names_its_teacher_and_may_start_from_its_layers():
    cfg = _cfg({"distill": {"teacher": "big", "student_layers": 2}})
    small = cfg.model("small")
    assert small.base_model is None and small.distill.temperature == 2.0 and small.distill.alpha == 0.5
    assert small.distill.max_gap == 0.02 and "big's production" in small.starts_from()
    assert _cfg({"base_model": "y", "distill": {"teacher": "big"}}).model("small").starts_from() == "y"


@pytest.mark.parametrize("student,teacher,quoted", [
    ({"distill": {"teacher": "nobody", "student_layers": 2}}, TEACHER, "'nobody' is not a model"),
    ({"distill": {"teacher": "big"}}, TEACHER, "needs a base_model"),  # not the default: a student is smaller
    ({"base_model": "y", "distill": {"teacher": "big", "student_layers": 2}}, TEACHER,
     "base_model 'y' and distill.student_layers 2 both say where v1 starts"),
    ({"base_model": "y", "golden_dataset": "g.tsv", "distill": {"teacher": "big"}}, TEACHER,
     "its own golden_dataset 'g.tsv' would never be read"),
    ({"base_model": "y", "distill": {"teacher": "small"}}, TEACHER, "its own distill.teacher"),
    ({"base_model": "y", "distill": {"teacher": "big"}}, {**TEACHER, "labels": ["a", "b"]}, "same task and labels"),
    ({"base_model": "y", "distill": {"teacher": "big", "temperature": 0}}, TEACHER, "temperature"),
    ({"base_model": "y", "task": "token-classification", "labels": ["PER"], "distill": {"teacher": "big"}},
     {**TEACHER, "task": "token-classification", "labels": ["PER"]}, "one answer per text"),
])
def test_a_student_config_that_cannot_work_is_refused_saying_why(student, teacher, quoted):
    with pytest.raises(ConfigError, match=quoted):
        _cfg(student, teacher)


def test_a_teacher_may_not_be_a_student_itself_and_teachers_train_first():
    with pytest.raises(ConfigError, match="is itself a student"):
        parse_config({"models": [TEACHER, {"name": "mid", "base_model": "y", "labels": LABELS,
                                           "distill": {"teacher": "big"}},
                                 {"name": "tiny", "base_model": "y", "labels": LABELS, "distill": {"teacher": "mid"}}]})
    cfg = parse_config({"models": [{"name": "small", "labels": LABELS, "distill": {"teacher": "big",
                                                                                 "student_layers": 1}}, TEACHER]})
    assert [m.name for m in cfg.in_training_order()] == ["big", "small"]


def test_a_student_keeps_layers_spread_from_the_first_to_the_last():
    assert student_layers(6, 2) == [0, 5]
    assert student_layers(6, 3) == [0, 2, 5]
    assert student_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert student_layers(6, 6) == list(range(6))
    assert student_layers(6, 1) == [5]
    with pytest.raises(ValueError, match="between 1 and the teacher's 6 layers"):
        student_layers(6, 7)


def _golden(right: int, n: int = 100):
    return classification_metrics([0] * (n // 2) + [1] * (n // 2),
                                  [0] * right + [1] * (n // 2 - right) + [1] * (n // 2), LABELS)


def test_the_gate_holds_a_student_within_max_gap_of_its_teacher():
    teacher = TeacherEvidence(model="big", version="v3", golden=_golden(45), max_gap=0.02)  # 0.95
    close = decide(Evidence(metric="accuracy", golden=_golden(44), teacher=teacher), GateConfig())  # 0.94
    assert close.accepted and [c.name for c in close.checks] == ["golden", "fresh", "teacher", "sanity"]
    assert close.checks[2].numbers["teacher_accuracy"] == 0.95
    edge = decide(Evidence(metric="accuracy", golden=_golden(43), teacher=teacher), GateConfig())  # 0.93
    assert edge.accepted  # exactly max_gap below
    far = decide(Evidence(metric="accuracy", golden=_golden(42), teacher=teacher), GateConfig())  # 0.92
    assert not far.accepted and "more than 0.02 below teacher big v3's 0.9500" in far.reason


def test_the_loss_is_the_soft_labels_mixed_with_the_hard_by_alpha():
    import torch
    import torch.nn.functional as F

    from tuneloop.training.distill import distillation_loss

    task = make_task("text-classification", LABELS)
    teacher = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    targets = torch.tensor([1, 1])
    hard = float(F.cross_entropy(teacher, targets))  # what the model's head computes
    # A student that answers as the teacher does has no soft loss left: only (1 - alpha) x hard.
    assert float(distillation_loss(teacher.clone(), teacher, targets, None, task, 2.0, 0.25)) == pytest.approx(
        0.75 * hard, rel=1e-5)
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    p = (teacher / 2).softmax(-1)
    kl_rows = (p * (p.log() - torch.log(torch.tensor(0.5)))).sum(-1)
    kl = float(kl_rows.mean())
    assert float(distillation_loss(student, teacher, targets, None, task, 2.0, 1.0)) == pytest.approx(kl * 4, rel=1e-5)
    multi = make_task("multi-label-classification", LABELS)
    hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(distillation_loss(teacher.clone(), teacher, hot, None, multi, 1.0, 0.0)) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(teacher, hot)), rel=1e-5)


def test_a_row_without_a_label_learns_from_the_soft_labels_alone():
    """A transfer text's placeholder target (class 0) never reaches the loss: its row has
    the soft loss at full weight, a labelled row alpha's mix."""
    import torch
    import torch.nn.functional as F

    from tuneloop.training.distill import distillation_loss

    task = make_task("text-classification", LABELS)
    teacher, student = torch.tensor([[2.0, -1.0], [0.0, 3.0]]), torch.tensor([[0.5, 0.0], [1.0, -1.0]])
    targets, labelled = torch.tensor([1, 0]), torch.tensor([True, False])
    soft = F.kl_div(F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1), log_target=True,
                    reduction="none").sum(-1) * 4
    hard = F.cross_entropy(student, targets, reduction="none")
    expected = ((0.5 * soft[0] + 0.5 * hard[0]) + soft[1]) / 2
    got = distillation_loss(student, teacher, targets, labelled, task, 2.0, 0.5)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    # The placeholder is not read: another class there changes nothing.
    assert float(distillation_loss(student, teacher, torch.tensor([1, 1]), labelled, task, 2.0, 0.5)) == \
        pytest.approx(float(got), rel=1e-6)
    multi = make_task("multi-label-classification", LABELS)
    none = torch.tensor([False, False])
    assert float(distillation_loss(student, teacher, torch.zeros(2, 2), none, multi, 1.0, 0.3)) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(student, teacher.sigmoid())), rel=1e-5)


@pytest.mark.parametrize("family", ["bert", "distilbert", "modernbert"])
def test_keep_layers_cuts_a_model_to_a_working_smaller_one(tmp_path, family):
    import torch
    import transformers

    from tests.tiny_models import build_tiny_model
    from tuneloop.training.distill import keep_layers

    path = build_tiny_model(tmp_path / "m", LABELS, family=family)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = torch.tensor([[101, 2000, 2001, 102]])
    whole = sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # as training moves them: ModernBERT's first layer is built without its attention norm
        for name, p in model.named_parameters():
            if "layers.1." in name and "norm" in name:
                p.mul_(1.5).add_(0.1)
    keep_layers(model, [1])
    assert model.config.num_hidden_layers == 1 and sum(p.numel() for p in model.parameters()) < whole
    assert model(input_ids=ids).logits.shape == (1, 2)
    model.save_pretrained(tmp_path / "cut")  # ModernBERT's config checks its per-layer types against the count
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cut").eval()
    assert again.config.num_hidden_layers == 1
    assert torch.allclose(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_a_students_data_is_judged_on_the_teachers_golden_set_and_learns_its_seed(tmp_path):
    seed = tmp_path / "seed.tsv"
    seed.write_text("text\tlabel\n" + "".join(f"text {i}\t{LABELS[i % 2]}\n" for i in range(50)))
    cfg = _cfg({"distill": {"teacher": "big", "student_layers": 1}}, {**TEACHER, "seed_dataset": str(seed)},
               storage={"root": str(tmp_path / "store")})
    storage = Storage(cfg.storage.root)
    tasks, registry = model_tasks(cfg.models), Registry(storage)
    feedback = FeedbackStore(storage, str(tmp_path / "journal"), tasks)
    teachers = assemble(tasks["big"], cfg.model("big"), cfg.training, registry, feedback, None)  # freezes golden
    students = assemble(tasks["small"], cfg.model("small"), cfg.training, registry, feedback, None,
                        teacher=cfg.model("big"))
    assert students.golden.equals(teachers.golden) and students.summary["golden"]["model"] == "big"
    assert registry.golden("small") is None  # nothing frozen under the student's name
    assert sorted(students.train.column("text").to_pylist()) == sorted(teachers.train.column("text").to_pylist())
    assert students.summary["seed"]["path"] == str(seed)


def test_a_students_transfer_texts_train_beside_its_labelled_rows_without_labels(tmp_path):
    """A sample of the transfer set joins the job, capped at transfer_rows_per_job, each
    text once, never a golden text or one the job has a label for; its rows reach the
    workers with placeholder targets that LABELLED_COLUMN marks."""
    import pyarrow.parquet as pq

    from tuneloop.training.job_data import LABELLED_COLUMN, TRANSFER, with_training_columns

    seed = tmp_path / "seed.tsv"
    seed.write_text("text\tlabel\n" + "".join(f"text {i}\t{LABELS[i % 2]}\n" for i in range(50)))
    transfer = tmp_path / "unlabelled.parquet"
    # 40 new texts, one twice, one with different case and spaces, a seed text, an empty one.
    texts = [f"other {i}" for i in range(40)] + ["other 3", "  OTHER 4 ", "text 7", ""]
    pq.write_table(pa.table({"text": texts, "meta": list(range(len(texts)))}), transfer)
    cfg = _cfg({"distill": {"teacher": "big", "student_layers": 1, "transfer_dataset": str(transfer),
                            "transfer_rows_per_job": 30}}, {**TEACHER, "seed_dataset": str(seed)},
               storage={"root": str(tmp_path / "store")})
    storage = Storage(cfg.storage.root)
    tasks, registry = model_tasks(cfg.models), Registry(storage)
    feedback = FeedbackStore(storage, str(tmp_path / "journal"), tasks)
    teachers = assemble(tasks["big"], cfg.model("big"), cfg.training, registry, feedback, None)
    students = assemble(tasks["small"], cfg.model("small"), cfg.training, registry, feedback, None,
                        teacher=cfg.model("big"))
    rows = students.train.to_pylist()
    extra = [r for r in rows if r["source"] == TRANSFER]
    assert len(extra) == 30 and all(r["label"] is None for r in extra)
    assert {r["text"] for r in extra} <= {f"other {i}" for i in range(40)}  # no seed, golden or validation text
    assert len({r["text"] for r in extra}) == 30
    labelled = sorted(r["text"] for r in rows if r["source"] != TRANSFER)
    assert labelled == sorted(teachers.train.column("text").to_pylist())
    assert students.summary["transfer"] == {"path": str(transfer), "sha256": students.summary["transfer"]["sha256"],
                                            "texts": 43, "new_texts": 40, "rows": 30}
    columns = with_training_columns(tasks["small"], students.train).to_pylist()
    assert [c[LABELLED_COLUMN] for c in columns] == [r["source"] != TRANSFER for r in rows]
    assert [c["label_id"] for c in columns] == [LABELS.index(r["label"]) if r["label"] else 0 for r in rows]
    assert LABELLED_COLUMN not in with_training_columns(tasks["big"], teachers.train).column_names


def test_a_transfer_set_is_read_for_its_texts_alone_in_any_seed_format(tmp_path):
    import pyarrow.parquet as pq

    from tuneloop.control.preflight import _unreadable
    from tuneloop.training.data import read_texts

    pq.write_table(pa.table({"label": ["x", "y"], "text": ["one", "two"]}), tmp_path / "t.parquet")
    (tmp_path / "t.tsv").write_text('text\tlabel\n"quoted" one\tx\n\t\n   \tx\ntwo\t\n')
    (tmp_path / "t.jsonl").write_text('{"text": "one", "label": 1}\n{"text": 2, "label": "b"}\n{"label": "c"}\n')
    assert read_texts(str(tmp_path / "t.parquet")) == ["one", "two"]
    assert read_texts(str(tmp_path / "t.tsv")) == ['"quoted" one', "two"]  # blank texts left out
    assert read_texts(str(tmp_path / "t.jsonl")) == ["one", "2"]
    pq.write_table(pa.table({"sentence": ["one"]}), tmp_path / "no-text.parquet")
    with pytest.raises(ValueError, match="has no column 'text'; it has \\['sentence'\\]"):
        read_texts(str(tmp_path / "no-text.parquet"))
    (tmp_path / "blank.tsv").write_text("text\n\n  \n")
    assert _unreadable(str(tmp_path / "blank.tsv"), None) == [
        f"dataset {str(tmp_path / 'blank.tsv')!r} has no texts: its text column is empty"]
    assert _unreadable(str(tmp_path / "t.tsv"), None) == []


def test_a_transfer_set_needs_the_soft_labels_to_weigh_something(tmp_path):
    with pytest.raises(ConfigError, match="transfer_dataset 'u.tsv' has no labels but the teacher's, and alpha 0"):
        _cfg({"base_model": "y", "distill": {"teacher": "big", "alpha": 0, "transfer_dataset": "u.tsv"}})
    with pytest.raises(ConfigError, match="transfer_rows_per_job"):
        _cfg({"base_model": "y", "distill": {"teacher": "big", "transfer_dataset": "u.tsv", "transfer_rows_per_job": 0}})


def test_the_teacher_scores_with_its_own_tokenizer_in_the_students_label_order(tmp_path):
    """The student (its own vocabulary, ``test_training.py``) never sees the teacher's
    token ids: the scorer reads the texts with the teacher's tokenizer, and puts its logits
    in the student's head order, whatever order the teacher's head has."""
    import pyarrow as pa
    import torch
    import transformers

    from tests.tiny_models import build_tiny_model
    from tuneloop.training.distill import TEACHER_COLUMN, _TeacherScorer

    path = build_tiny_model(tmp_path / "teacher", LABELS)
    texts = ["the film was lovely", "an awful, awful meal", "ok"]
    scorer = _TeacherScorer({"base_model": path}, "AutoModelForSequenceClassification", list(reversed(LABELS)), 32,
                            use_gpu=False)
    scored = scorer(pa.table({"text": texts}))[TEACHER_COLUMN].to_pylist()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.inference_mode():
        own = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    assert torch.allclose(torch.tensor(scored), own.flip(-1), atol=1e-5)  # reversed: the student's order
    assert len({tuple(row) for row in scored}) == 3  # each text its own answer
    assert scorer.dtype == "fp32"
    # In bf16 only where its bf16 answers passed parity and this CPU computes bf16 natively.
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    fast = _TeacherScorer({"base_model": path}, "AutoModelForSequenceClassification", list(reversed(LABELS)), 32,
                          use_gpu=False, bf16=True)
    assert fast.dtype == ("bf16" if native else "fp32")
    in_bf16 = fast(pa.table({"text": texts}))
    assert set(in_bf16["_teacher_dtype"].to_pylist()) == {fast.dtype}
    assert torch.allclose(torch.tensor(in_bf16[TEACHER_COLUMN].to_pylist()), own.flip(-1), atol=0.05)

"""The training recipe's decisions (training/recipe.py): precision, freezing, dropout, step
counts and early stopping, on names and numbers alone."""

import math

import pytest

from tuneloop.core.config import TrainingConfig
from tuneloop.training.recipe import (
    EarlyStopping,
    dropout_overrides,
    eta,
    frozen_parameters,
    head_order,
    optimizer_steps,
    resolve_precision,
    startup_parts,
    training_speed,
    zero_stage_to_run,
)

# A BERT classifier's parameter names, two layers deep (what named_parameters() yields).
BERT = [
    "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.LayerNorm.weight",
    *(f"bert.encoder.layer.{i}.{part}" for i in range(2)
      for part in ("attention.self.query.weight", "intermediate.dense.weight", "output.LayerNorm.bias")),
    "bert.pooler.dense.weight",
    "classifier.weight",
    "classifier.bias",
]
GPT2 = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.attn.c_attn.weight", "transformer.ln_f.weight", "score.weight"]


def test_precision_by_device():
    assert resolve_precision("auto", use_gpu=False, bf16_supported=False) == "fp32"
    assert resolve_precision("auto", use_gpu=True, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", use_gpu=True, bf16_supported=False) == "fp16"  # V100, T4
    assert resolve_precision("fp32", use_gpu=True, bf16_supported=True) == "fp32"
    assert resolve_precision("fp16", use_gpu=True, bf16_supported=True) == "fp16"
    with pytest.raises(ValueError, match="does not support bf16"):
        resolve_precision("bf16", use_gpu=True, bf16_supported=False)
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_precision("fp16", use_gpu=False, bf16_supported=False)
    assert resolve_precision("fp16", use_gpu=True, bf16_supported=False) == "fp16"


def test_a_lone_fp32_worker_trains_at_zero_stage_0():
    assert [zero_stage_to_run(stage, 1, "fp32") for stage in (0, 1, 2, 3)] == [0, 0, 0, 0]
    assert zero_stage_to_run(2, 2, "fp32") == 2  # two workers share: the stage holds
    assert zero_stage_to_run(2, 1, "bf16") == 2  # half precision: its fp32 master weights are exported
    assert zero_stage_to_run(0, 1, "bf16") == zero_stage_to_run(0, 4, "fp16") == 1  # stage 0 keeps none to export
    assert zero_stage_to_run(1, 1, "fp16") == 1


def test_config_refuses_half_precision_on_cpu_naming_the_value():
    with pytest.raises(ValueError, match="precision 'bf16' needs use_gpu: true"):
        TrainingConfig(precision="bf16")
    assert TrainingConfig(precision="bf16", use_gpu=True).precision == "bf16"
    assert TrainingConfig().precision == "auto"
    assert TrainingConfig(precision="fp16", use_gpu=True, zero_stage=0).zero_stage == 0  # runs at stage 1


def test_nothing_frozen_by_default():
    assert frozen_parameters(BERT, "bert", freeze_layers=0, feature_extraction=False) == set()


def test_freeze_layers_takes_embeddings_and_the_lowest_blocks():
    frozen = frozen_parameters(BERT, "bert", freeze_layers=1, feature_extraction=False)
    assert {n for n in frozen if "embeddings" in n} == {n for n in BERT if "embeddings" in n}
    assert all(n in frozen for n in BERT if ".layer.0." in n)
    assert not any(".layer.1." in n or "pooler" in n or "classifier" in n for n in frozen)
    everything = frozen_parameters(BERT, "bert", freeze_layers=2, feature_extraction=False)
    assert all(".layer.1." in n for n in everything - frozen)
    assert "bert.pooler.dense.weight" not in everything  # above the top block: trains


def test_feature_extraction_freezes_the_whole_encoder_but_never_the_head():
    frozen = frozen_parameters(BERT, "bert", freeze_layers=0, feature_extraction=True)
    assert frozen == {n for n in BERT if n.startswith("bert.")}
    gpt = frozen_parameters(GPT2, "transformer", freeze_layers=1, feature_extraction=False)
    assert gpt == {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight"}


def test_freeze_layers_takes_every_embedding_stage_that_feeds_the_blocks():
    """ELECTRA's projection of its small embeddings and DeBERTa's relative position
    embeddings sit outside every block and feed them all: they trained while the layers
    below them were 'frozen'."""
    electra = ["electra.embeddings.word_embeddings.weight", "electra.embeddings_project.weight",
               "electra.embeddings_project.bias", "electra.encoder.layer.0.attention.self.query.weight",
               "electra.encoder.layer.1.attention.self.query.weight", "classifier.dense.weight"]
    assert frozen_parameters(electra, "electra", freeze_layers=1, feature_extraction=False) == set(electra[:4])
    deberta = ["deberta.embeddings.word_embeddings.weight", "deberta.encoder.rel_embeddings.weight",
               "deberta.encoder.layer.0.attention.self.query_proj.weight",
               "deberta.encoder.layer.1.attention.self.query_proj.weight", "classifier.weight"]
    assert frozen_parameters(deberta, "deberta", freeze_layers=1, feature_extraction=False) == set(deberta[:3])
    # What every block reads besides: DeBERTa-v2's norm of those embeddings and its
    # convolution over layer 0's output; MPNet's relative attention bias. Not the pooler.
    v2 = ["deberta.embeddings.word_embeddings.weight", "deberta.encoder.rel_embeddings.weight",
          "deberta.encoder.LayerNorm.weight", "deberta.encoder.conv.conv.weight",
          "deberta.encoder.conv.LayerNorm.bias", "deberta.encoder.layer.0.output.dense.weight",
          "deberta.encoder.layer.1.output.dense.weight", "pooler.dense.weight", "classifier.weight"]
    assert frozen_parameters(v2, "deberta", freeze_layers=1, feature_extraction=False) == set(v2[:6])
    mpnet = ["mpnet.embeddings.word_embeddings.weight", "mpnet.encoder.relative_attention_bias.weight",
             "mpnet.encoder.layer.0.output.dense.weight", "mpnet.encoder.layer.1.output.dense.weight",
             "mpnet.pooler.dense.weight", "classifier.dense.weight"]
    assert frozen_parameters(mpnet, "mpnet", freeze_layers=1, feature_extraction=False) == set(mpnet[:3])


def test_a_frozen_model_whose_head_has_no_bias_gets_no_empty_parameter_group():
    """DeepSpeed's ZeRO 1/2 read each group's first parameter: GPT-2's score head has no
    bias, so with its encoder frozen the no-decay group was empty (an IndexError)."""
    import torch

    from tuneloop.training.loop import _param_groups

    head = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))
    groups = _param_groups(head, 0.01)
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.01)]


def test_an_error_every_training_worker_raised_reaches_the_job_as_its_message():
    """Ray Train wraps a worker's exception in its traceback: the job's error carried that
    instead of the loop's own message."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from tuneloop.training.launcher import worker_error

    why = ValueError("the tokenizer has neither a pad nor an end token")
    wrapped = {rank: UserExceptionWithTraceback(why, "Traceback ...\nValueError: the tokenizer ...") for rank in (0, 1)}
    unwrapped = worker_error(WorkerGroupError("workers failed", wrapped))
    assert isinstance(unwrapped, ValueError) and str(unwrapped) == "the tokenizer has neither a pad nor an end token"
    bug = {0: UserExceptionWithTraceback(KeyError("x"), "Traceback ...")}
    assert worker_error(WorkerGroupError("workers failed", bug)) is None  # a bug keeps its traceback
    # One worker found the job marked lost; the other died of it, waiting at a collective.
    from tuneloop.store.jobs import JobLost

    lost = {0: UserExceptionWithTraceback(JobLost("job abc was marked failed while it ran"), "Traceback ..."),
            1: UserExceptionWithTraceback(RuntimeError("Connection closed by peer"), "Traceback ...")}
    found = worker_error(WorkerGroupError("workers failed", lost))
    assert isinstance(found, JobLost) and str(found) == "job abc was marked failed while it ran"


def test_freezing_what_the_model_does_not_have_says_so():
    with pytest.raises(ValueError, match="freeze_layers 3 exceeds the model's 2 encoder layers"):
        frozen_parameters(BERT, "bert", freeze_layers=3, feature_extraction=False)
    with pytest.raises(ValueError, match="no encoder parameters under 'roberta'"):
        frozen_parameters(BERT, "roberta", freeze_layers=1, feature_extraction=False)
    with pytest.raises(ValueError, match="no head"):
        frozen_parameters(["bert.embeddings.weight"], "bert", freeze_layers=0, feature_extraction=True)
    # ALBERT's blocks share one set of weights: no lowest layer to freeze alone, but the encoder can be.
    albert = ["albert.embeddings.word_embeddings.weight", "albert.encoder.embedding_hidden_mapping_in.weight",
              "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight", "classifier.weight"]
    with pytest.raises(ValueError, match="freeze_layers 1: the encoder under 'albert' has no numbered layers"):
        frozen_parameters(albert, "albert", freeze_layers=1, feature_extraction=False)
    assert frozen_parameters(albert, "albert", freeze_layers=0, feature_extraction=True) == set(albert[:3])


def test_dropout_sets_only_the_keys_the_config_has():
    bert_config = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "classifier_dropout": None,
                   "hidden_size": 384}
    assert dropout_overrides(bert_config, 0.3) == {
        "hidden_dropout_prob": 0.3, "attention_probs_dropout_prob": 0.3, "classifier_dropout": 0.3}
    assert dropout_overrides(bert_config, None) == {}
    assert dropout_overrides({"dropout": 0.1, "seq_classif_dropout": 0.2}, 0.0) == {"dropout": 0.0,
                                                                                   "seq_classif_dropout": 0.0}
    modernbert = {"embedding_dropout": 0.0, "mlp_dropout": 0.0, "attention_dropout": 0.0, "classifier_dropout": 0.0,
                  "use_dropout_mask": True, "dropout_kind": "standard", "hidden_size": 64}
    assert dropout_overrides(modernbert, 0.1) == {"embedding_dropout": 0.1, "mlp_dropout": 0.1,
                                                  "attention_dropout": 0.1, "classifier_dropout": 0.1}
    assert dropout_overrides({"resid_pdrop": 0.1, "embd_pdrop": 0.1, "pooler_dropout": 0}, 0.2) == {
        "resid_pdrop": 0.2, "embd_pdrop": 0.2, "pooler_dropout": 0.2}


def test_optimizer_steps_count_accumulated_micro_batches():
    # 100 rows on 2 workers, 8 per micro-batch: 7 micro-batches an epoch each, 14 in 2 epochs;
    # the optimizer steps at every 3rd: 4 steps (the last 2 micro-batches never step).
    assert optimizer_steps(100, 8, 2, accumulation=3, epochs=2, max_steps=None) == (3, 4)
    assert optimizer_steps(100, 8, 2, accumulation=1, epochs=2, max_steps=5) == (1, 5)
    # Fewer micro-batches than the accumulation asked for: accumulate them all, step once.
    assert optimizer_steps(20, 8, 2, accumulation=4, epochs=1, max_steps=None) == (2, 1)
    assert optimizer_steps(0, 8, 2, accumulation=4, epochs=1, max_steps=None) == (1, 1)


def test_early_stopping_keeps_the_best_epoch_and_waits_out_its_patience():
    stop = EarlyStopping(patience=2, min_delta=0.01)
    assert stop.update(0, 0.50) and not stop.should_stop
    assert not stop.update(1, 0.495)  # within min_delta: no gain
    assert not stop.should_stop
    assert not stop.update(2, math.nan)  # a diverged epoch is never best
    assert stop.should_stop and stop.best_epoch == 0
    again = EarlyStopping(patience=1)
    again.update(0, 0.5)
    assert again.update(1, 0.4) and again.best_epoch == 1 and not again.should_stop
    never = EarlyStopping(patience=None)
    for epoch, loss in enumerate([0.3, 0.4, 0.5, 0.6]):
        never.update(epoch, loss)
    assert not never.should_stop and never.best_epoch == 0


def test_eta_is_the_pace_so_far_times_the_steps_left():
    assert eta(30.0, 10, 40) == ", ETA 1m30s"
    assert eta(5.0, 10, 20) == ", ETA 5s"
    assert eta(0.0, 0, 20) == "" and eta(9.0, 20, 20) == ""


def test_inherited_rows_are_a_checkpoints_rows_for_a_head_with_labels_added():
    from tuneloop.training.recipe import inherited_rows

    assert inherited_rows(["NEGATIVE", "positive"], ["negative", "neutral", "positive"]) == [0, None, 1]
    assert inherited_rows(["LABEL_0", "LABEL_1"], ["a", "b", "c"]) is None  # a base encoder: a fresh head
    assert inherited_rows(["a", "b"], ["a", "b"]) is None and inherited_rows(["a", "x"], ["a", "b", "c"]) is None
    assert inherited_rows(None, ["a"]) is None


def test_head_order_maps_a_checkpoints_rows_to_the_configs_labels():
    assert head_order(["POSITIVE", "NEGATIVE"], ["negative", "positive"]) == [1, 0]
    assert head_order(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]) == \
        [0, 3, 4, 1, 2]
    assert head_order(["negative", "positive"], ["negative", "positive"]) is None  # already in order
    assert head_order(["LABEL_0", "LABEL_1"], ["negative", "positive"]) is None  # generic: a new head
    assert head_order(["a", "b", "c"], ["a", "b"]) is None and head_order(None, ["a"]) is None
    assert head_order(["spam", "ham"], ["negative", "positive"]) is None  # other labels


def test_a_checkpoint_with_the_labels_in_another_order_trains_from_its_rows_in_order(tmp_path):
    """A real tiny checkpoint whose head says [positive, negative] (its bias makes positive win),
    loaded for a config listing [negative, positive]: the rows move, so it still answers
    positive, now at index 1 (loading alone, no Ray)."""
    import torch
    from transformers import AutoModelForTokenClassification

    from tests.tiny_models import build_tiny_model
    from tuneloop.core.tasks import make_task
    from tuneloop.training.model_files import load_for_training

    path = build_tiny_model(tmp_path / "m", ["positive", "negative"], bias=[4.0, -4.0])
    model, added = load_for_training(path, make_task("text-classification", ["negative", "positive"]), None)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.classifier.bias.tolist() == [-4.0, 4.0]
    tagger = build_tiny_model(tmp_path / "t", ["LOC", "PER"], task="token-classification")
    before = AutoModelForTokenClassification.from_pretrained(tagger).classifier.weight  # O, B-LOC, I-LOC, B-PER, I-PER
    after, _ = load_for_training(tagger, make_task("token-classification", ["PER", "LOC"]), None)
    assert list(after.config.id2label.values()) == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    assert torch.equal(after.classifier.weight, before[[0, 3, 4, 1, 2]])
    assert added == []
    # A label added to the config: production's rows stay for the labels it had.
    grown, added = load_for_training(path, make_task("text-classification", ["negative", "neutral", "positive"]),
                                     None)
    assert added == [1] and grown.classifier.bias[[0, 2]].tolist() == [-4.0, 4.0]
    # Production's rows come from its safetensors alone, not from a second load of the model.
    from tuneloop.training.model_files import _saved_rows

    weight, bias = _saved_rows(path, ["classifier.weight", "classifier.bias"], 2)
    assert bias.tolist() == [4.0, -4.0] and weight.shape[0] == 2
    # As many labels under other names: a fresh head, not [positive, negative]'s rows read as [neg, pos].
    fresh, added = load_for_training(path, make_task("text-classification", ["neg", "pos"]), None)
    assert fresh.classifier.bias.tolist() == [0.0, 0.0] and not torch.equal(fresh.classifier.weight, weight)
    generic = build_tiny_model(tmp_path / "g", ["LABEL_0", "LABEL_1"], bias=[4.0, -4.0])
    kept, _ = load_for_training(generic, make_task("text-classification", ["neg", "pos"]), None)
    assert kept.classifier.bias.tolist() == [4.0, -4.0]  # placeholder names: nothing to say they differ
    assert _saved_rows(path, ["classifier.weight"], 3) is None and _saved_rows(path, ["no.such"], 2) is None
    more, added = load_for_training(tagger, make_task("token-classification", ["PER", "LOC", "MISC"]), None)
    assert added == [5, 6] and torch.equal(more.classifier.weight[:5], before[[0, 3, 4, 1, 2]])


def test_a_text_classifier_trains_one_class_a_text_from_a_multi_label_checkpoint(tmp_path):
    """The model's built-in loss follows the checkpoint's problem_type: BCE over class ids
    failed every job of a model started from a multi-label hub checkpoint."""
    import torch

    from tests.tiny_models import build_tiny_model
    from tuneloop.core.tasks import make_task
    from tuneloop.training.model_files import load_for_training

    import json

    path = build_tiny_model(tmp_path / "m", ["joy", "anger", "fear"], task="multi-label-classification")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    model, _ = load_for_training(path, make_task("text-classification", ["joy", "anger"]), None)
    out = model(input_ids=torch.tensor([[101, 2000, 102]] * 2), labels=torch.tensor([0, 1]))
    assert model.config.problem_type == "single_label_classification" and torch.isfinite(out.loss)


def test_training_speed_leaves_the_first_epoch_out_of_the_steady_state():
    parts = {"workers": 5.5, "model_load": 3.0, "deepspeed": 0.5, "first_batch": 3.345}
    speed = training_speed([(1000, 50.0), (1000, 20.0), (1000, 30.0)], parts)
    assert speed == {"startup_s": 12.35, "startup_parts": parts, "epoch_samples_per_s": [20.0, 50.0, 33.33],
                     "steady_samples_per_s": 40.0}
    assert training_speed([(300, 10.0)], None) == {"startup_s": None, "startup_parts": None,
                                                    "epoch_samples_per_s": [30.0], "steady_samples_per_s": 30.0}
    assert training_speed([], None)["steady_samples_per_s"] is None  # a job stopped before its first epoch ended


def test_startup_parts_split_the_start_up_at_the_workers_marks():
    marks = {"loop_started": 106.0, "model_loaded": 109.25, "engine_ready": 109.75, "first_batch": 112.0}
    assert startup_parts(100.0, marks) == {"workers": 6.0, "model_load": 3.25, "deepspeed": 0.5, "first_batch": 2.25}
    assert startup_parts(100.0, {**marks, "first_batch": None}) is None  # no batch came
    assert startup_parts(100.0, {k: v for k, v in marks.items() if k != "first_batch"}) is None
    # Another node's clock a little behind the driver's: a part is never negative.
    assert startup_parts(107.0, marks)["workers"] == 0.0


def test_freeze_layers_beyond_the_models_layers_is_known_from_its_config():
    from tuneloop.training.recipe import layer_problem

    bert, gpt2 = {"num_hidden_layers": 12}, {"n_layer": 6}
    assert "exceeds the model's 6" in layer_problem({"n_layers": 6}, 7, False)  # DistilBERT's config.json
    assert "freeze_layers 13 exceeds the model's 12 encoder layers" in layer_problem(bert, 13, False)
    assert layer_problem(bert, 12, False) is None and layer_problem(bert, 13, True) is None
    assert "exceeds the model's 6" in layer_problem(gpt2, 7, False)
    assert "exceeds the model's 2" in layer_problem(bert, 3, False, student_layers=2)  # a student's v1
    assert layer_problem({}, 40, False) is None  # unknown: the workers check the parameters
    assert "student_layers 7 exceeds the teacher's 6" in layer_problem(gpt2, 0, False, student_layers=7)


@pytest.mark.parametrize(("task_name", "labels"), [("text-classification", ["negative", "positive"]),
                                                   ("token-classification", ["PER", "LOC"]),
                                                   ("multi-label-classification", ["a", "b", "c"])])
def test_the_evaluation_loss_is_the_heads_own_computed_in_fp32(tmp_path, task_name, labels):
    """Early stopping reads the evaluation loss: computed from fp32 logits (a bf16 engine's
    head rounded it), it must stay the loss the model's head computes."""
    import torch
    import transformers

    from tests.tiny_models import build_tiny_model
    from tuneloop.core.tasks import make_task
    from tuneloop.training.evaluation import eval_loss

    task = make_task(task_name, labels)
    path = build_tiny_model(tmp_path / "m", labels, task=task_name)
    model = getattr(transformers, task.auto_class).from_pretrained(path, **task.model_options).eval()
    enc = transformers.AutoTokenizer.from_pretrained(path)(["one text", "and another longer one"], padding=True,
                                                          return_tensors="pt")
    heads = len(task.head_labels())
    if task_name == "token-classification":
        target = torch.randint(0, heads, enc["input_ids"].shape)
        target[:, 0] = -100  # [CLS]: no tag
    elif task_name == "multi-label-classification":
        target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    else:
        target = torch.tensor([0, 1])
    with torch.no_grad():
        out = model(**enc, labels=target)
    def mean(logits):
        summed, terms = eval_loss(logits, target, task)
        return summed, float(summed) / terms

    assert mean(out.logits.bfloat16())[1] == pytest.approx(float(out.loss), rel=1e-2)
    assert mean(out.logits)[1] == pytest.approx(float(out.loss), rel=1e-6)
    # From bf16 logits: upcast first, so the loss is fp32's of those very logits, not bf16's (3 digits).
    rounded = out.logits.bfloat16()
    summed, loss = mean(rounded)
    assert summed.dtype == torch.float32
    assert loss == pytest.approx(mean(rounded.float())[1], rel=1e-6)
    if task_name == "token-classification":  # no tagged token: nothing summed, not NaN
        assert eval_loss(out.logits, torch.full_like(target, -100), task)[1] == 0
        assert float(eval_loss(out.logits, torch.full_like(target, -100), task)[0]) == 0.0
    # Training: the head's own loss, or a zero with zero gradients where no token is tagged
    # (the head's mean over none is NaN, and the epoch's logged loss with it).
    from tuneloop.training.loop import _training_loss

    assert _training_loss(out, target) is out.loss
    untagged = torch.full_like(target, -100) if task_name == "token-classification" else None
    if untagged is not None:
        head_loss = model(**enc, labels=untagged)
        assert math.isnan(float(head_loss.loss))
        zero = _training_loss(head_loss, untagged)
        zero.backward()
        assert float(zero) == 0.0 and all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_a_validation_row_of_control_characters_leaves_the_token_loss_finite(tmp_path, monkeypatch):
    """A feedback text of control characters (stored before feedback refused them) is all
    special tokens: the pass it had to itself averaged to a NaN loss, which made the whole
    validation loss NaN and stopped the job early."""
    import pyarrow as pa
    import transformers

    from tests.tiny_models import build_tiny_model
    from tuneloop.core.tasks import make_task
    from tuneloop.training import evaluation
    from tuneloop.training.job_data import with_training_columns

    task = make_task("token-classification", ["PER", "LOC"])
    path = build_tiny_model(tmp_path / "m", ["PER", "LOC"], task="token-classification")
    model = getattr(transformers, task.auto_class).from_pretrained(path, **task.model_options)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    rows = pa.table({"text": ["Kofi Annan spoke in Geneva", "\x00\x01" * 3],
                     "entities": [[{"start": 0, "end": 10, "label": "PER"}, {"start": 20, "end": 26, "label": "LOC"}],
                                  []]})
    table = with_training_columns(task, rows)
    together = evaluation.evaluate(model, tokenizer, table, 32, task)
    monkeypatch.setattr(evaluation, "EVAL_BATCH_SIZE", 1)  # each row a pass of its own
    apart = evaluation.evaluate(model, tokenizer, table, 32, task)
    alone = evaluation.evaluate(model, tokenizer, table.slice(0, 1), 32, task)
    assert math.isfinite(apart["loss"]) and apart["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    assert together["loss"] == pytest.approx(apart["loss"], rel=1e-6)  # passes do not weigh it
    assert math.isnan(evaluation.evaluate(model, tokenizer, table.slice(1, 1), 32, task)["loss"])  # nothing to measure

"""A micro-batch in passes by length gives the loss and gradient of the batch padded whole:
real tiny models (no Ray, no DeepSpeed), dropout off so both runs draw nothing."""

from __future__ import annotations

import pytest

from tests.tiny_models import build_tiny_model
from tuneloop.core.tasks import make_task

TEXTS = ["ok", "Ada went to Paris with Bob " * 6, "fine film", "Rome and Paris and Berlin " * 5, "meh"]


def _gradients(model, loss) -> list:
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("task_name, labels", [("text-classification", ["neg", "pos"]),
                                               ("multi-label-classification", ["a", "b", "c"]),
                                               ("token-classification", ["PER", "LOC"])])
def test_passes_by_length_give_the_whole_batchs_loss_and_gradient(tmp_path, task_name, labels):
    import torch
    import transformers

    from tuneloop.training.length_passes import batch_loss, passes_of, targets_counted

    task = make_task(task_name, labels)
    path = build_tiny_model(tmp_path / "m", labels, task=task_name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = getattr(transformers, task.auto_class).from_pretrained(path).eval()  # no dropout: the same draws
    inputs = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    rows, width = inputs["input_ids"].shape
    torch.manual_seed(0)
    if task_name == "text-classification":
        target = torch.tensor([0, 1, 1, 0, 1])
    elif task_name == "multi-label-classification":
        target = torch.randint(0, 2, (rows, len(labels))).float()
    else:  # a tag per token, padding and special tokens ignored
        target = torch.randint(0, len(task.head_labels()), (rows, width))
        target[inputs["attention_mask"] == 0] = -100
        target[:, 0] = -100

    def loss_of(part, part_target, index):
        return model(**part, labels=part_target).loss, targets_counted(part_target)

    passes = passes_of(inputs, True)
    assert passes is not None and len(passes) >= 2  # short and long texts apart
    assert sorted(i for p in passes for i in p) == list(range(rows))
    whole = batch_loss(inputs, target, None, loss_of)
    whole_grads = _gradients(model, whole)
    cut = batch_loss(inputs, target, passes, loss_of)
    cut_grads = _gradients(model, cut)
    assert float(cut.detach()) == pytest.approx(float(whole.detach()), rel=1e-5)
    assert len(cut_grads) == len(whole_grads)
    for a, b in zip(cut_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_batch_of_one_length_or_with_passes_off_runs_whole():
    import torch

    from tuneloop.training.length_passes import passes_of

    same = {"attention_mask": torch.ones(4, 9, dtype=torch.long)}
    assert passes_of(same, True) is None
    mixed = {"attention_mask": torch.tensor([[1] * 3 + [0] * 57, [1] * 60] * 4)}
    assert passes_of(mixed, False) is None
    assert passes_of(mixed, True) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert passes_of({"attention_mask": mixed["attention_mask"][:2]}, True) is None  # 3 tokens save less than a pass


def test_what_a_heads_mean_is_over():
    import torch

    from tuneloop.training.length_passes import targets_counted

    assert targets_counted(torch.tensor([0, 1, 1])) == 3  # a class a row
    assert targets_counted(torch.tensor([[-100, 2, 1], [-100, -100, 0]])) == 3  # tags not ignored
    assert targets_counted(torch.zeros(2, 4)) == 8  # every label of every row

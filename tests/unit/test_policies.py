"""The pure decisions: gate, trigger, held-out split, metrics, DeepSpeed config."""

import pytest

from tuneloop.core.gate import evaluate_gate
from tuneloop.core.triggers import should_retrain
from tuneloop.training.data import is_held_out, seed_format
from tuneloop.training.deepspeed_config import build_deepspeed_config
from tuneloop.core.evaluation import EvalMetrics, classification_metrics


def _metrics(accuracy: float, f1: float = 0.5) -> EvalMetrics:
    return EvalMetrics(accuracy=accuracy, precision=0.5, recall=0.5, f1=f1, eval_rows=10)


def test_gate_accepts_first_version_and_ties_rejects_regressions():
    assert evaluate_gate("accuracy", _metrics(0.5), None).accepted
    assert evaluate_gate("accuracy", _metrics(0.9), _metrics(0.9)).accepted
    assert evaluate_gate("accuracy", _metrics(0.91), _metrics(0.9)).accepted
    d = evaluate_gate("accuracy", _metrics(0.89), _metrics(0.9))
    assert not d.accepted and "accuracy 0.8900 < production's 0.9000" in d.reason


def test_gate_compares_the_metric_it_is_given():
    # Higher accuracy, lower F1: a task gating on F1 rejects it.
    d = evaluate_gate("f1", _metrics(0.95, f1=0.40), _metrics(0.90, f1=0.60))
    assert not d.accepted and d.reason.startswith("f1 0.4000 < production's 0.6000")


@pytest.mark.parametrize(
    "pending, every_n, running, expected",
    [(0, 0, False, False), (100, 0, False, False), (4, 5, False, False), (5, 5, False, True),
     (9, 5, False, True), (50, 5, True, False)],
)
def test_trigger(pending, every_n, running, expected):
    assert should_retrain(pending, every_n, running) is expected


def test_held_out_split_is_stable_and_near_the_fraction():
    texts = [f"sentence number {i}" for i in range(5000)]
    first = [is_held_out(t, 0.2) for t in texts]
    assert first == [is_held_out(t, 0.2) for t in texts]
    assert 0.17 < sum(first) / len(first) < 0.23
    assert is_held_out("Great Film ", 0.2) == is_held_out("great film", 0.2)


def test_seed_format():
    assert seed_format("a/b.TSV") == ".tsv"
    with pytest.raises(ValueError, match="'.xlsx'"):
        seed_format("data.xlsx")


def test_metrics_match_hand_computation():
    # labels 0,1,2; per-class P/R: c0 1/1,1/2  c1 1/2,1/1  c2 1/1,1/1
    m = classification_metrics([0, 0, 1, 2], [0, 1, 1, 2], 3).model_dump()
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["recall"] == pytest.approx((0.5 + 1 + 1) / 3)
    f1 = [2 * 0.5 / 1.5, 2 * 0.5 / 1.5, 1.0]
    assert m["f1"] == pytest.approx(sum(f1) / 3)
    assert m["eval_rows"] == 4


def test_metrics_edge_cases():
    assert classification_metrics([], [], 2).accuracy == 0.0
    m = classification_metrics([0, 0], [1, 1], 2)  # never right: everything 0
    assert m.accuracy == 0 and m.f1 == 0
    with pytest.raises(ValueError):
        classification_metrics([0], [0, 1], 2)


def test_deepspeed_config_cpu_and_gpu():
    cpu = build_deepspeed_config(zero_stage=2, micro_batch_size=16, world_size=2, learning_rate=1e-4,
                                 weight_decay=0.01, total_steps=100, warmup_ratio=0.1, use_gpu=False)
    assert cpu["train_batch_size"] == 32
    assert cpu["zero_optimization"] == {"stage": 2}
    assert cpu["bf16"]["enabled"] is False
    assert cpu["optimizer"]["params"]["torch_adam"] is True
    assert cpu["scheduler"]["params"]["warmup_num_steps"] == 10
    assert cpu["scheduler"]["params"]["total_num_steps"] == 100
    gpu = build_deepspeed_config(zero_stage=3, micro_batch_size=8, world_size=4, learning_rate=1e-4,
                                 weight_decay=0.0, total_steps=1, warmup_ratio=0.0, use_gpu=True)
    assert gpu["bf16"]["enabled"] is True
    assert gpu["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # DeepSpeed needs >= 1 warmup step and a total beyond it, even for a one-step job.
    assert gpu["scheduler"]["params"]["warmup_num_steps"] == 1
    assert gpu["scheduler"]["params"]["total_num_steps"] == 2

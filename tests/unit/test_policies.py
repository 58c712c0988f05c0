"""The pure decisions: trigger, seed formats, metrics, DeepSpeed config."""

import pytest

from tuneloop.core.triggers import should_retrain
from tuneloop.training.data import seed_format
from tuneloop.training.deepspeed_config import build_deepspeed_config
from tuneloop.core.evaluation import classification_metrics


@pytest.mark.parametrize(
    "pending, every_n, running, expected",
    [(0, 0, False, False), (100, 0, False, False), (4, 5, False, False), (5, 5, False, True),
     (9, 5, False, True), (50, 5, True, False)],
)
def test_trigger(pending, every_n, running, expected):
    assert should_retrain(pending, every_n, running) is expected


def test_seed_format():
    assert seed_format("a/b.TSV") == ".tsv"
    with pytest.raises(ValueError, match="'.xlsx'"):
        seed_format("data.xlsx")


def test_metrics_match_hand_computation():
    # labels 0,1,2; per-class P/R: c0 1/1,1/2  c1 1/2,1/1  c2 1/1,1/1
    m = classification_metrics([0, 0, 1, 2], [0, 1, 1, 2], ["a", "b", "c"]).model_dump()
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["recall"] == pytest.approx((0.5 + 1 + 1) / 3)
    f1 = [2 * 0.5 / 1.5, 2 * 0.5 / 1.5, 1.0]
    assert m["f1"] == pytest.approx(sum(f1) / 3)
    assert m["eval_rows"] == 4
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}


def test_metrics_edge_cases():
    assert classification_metrics([], [], ["a", "b"]).accuracy == 0.0
    m = classification_metrics([0, 0], [1, 1], ["a", "b"])  # never right: everything 0
    assert m.accuracy == 0 and m.f1 == 0
    with pytest.raises(ValueError):
        classification_metrics([0], [0, 1], ["a", "b"])


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

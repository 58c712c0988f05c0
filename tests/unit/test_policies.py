"""The pure decisions: trigger, seed formats, metrics, DeepSpeed config."""

import pytest

from tuneloop.core.config import TriggerConfig
from tuneloop.core.triggers import which_trigger
from tuneloop.training.data import seed_format
from tuneloop.training.deepspeed_config import build_deepspeed_config, lr_multiplier, warmup_steps
from tuneloop.core.evaluation import classification_metrics


def _which(pending=1, running=False, now=1000.0, last=None, agreements=(), golden=None, **trigger):
    return which_trigger(TriggerConfig(**trigger), pending=pending, running=running, now=now, last_started=last,
                         agreements=agreements, golden_accuracy=golden)


@pytest.mark.parametrize(
    "pending, every_n, running, expected",
    [(0, 0, False, None), (100, 0, False, None), (4, 5, False, None), (5, 5, False, "feedback"),
     (9, 5, False, "feedback"), (50, 5, True, None)],
)
def test_count_trigger(pending, every_n, running, expected):
    assert _which(pending, running, every_n_feedback=every_n) == expected


def test_schedule_trigger_needs_the_interval_and_new_feedback():
    assert _which(pending=1, now=1000, last=500, interval_s=600) is None
    assert _which(pending=1, now=1100, last=500, interval_s=600) == "schedule"
    assert _which(pending=1, now=1100, last=None, interval_s=600) == "schedule"  # never trained by a job yet
    assert _which(pending=0, now=9999, last=500, interval_s=600) is None  # nothing new to learn


def test_accuracy_drop_trigger_compares_the_window_with_golden_accuracy():
    window = [True] * 8 + [False] * 2  # users agree 80% of the time
    assert _which(agreements=window, golden=0.90, accuracy_drop=0.05, accuracy_window=10) == "accuracy_drop"
    assert _which(agreements=window, golden=0.84, accuracy_drop=0.05, accuracy_window=10) is None
    assert _which(agreements=window[:9], golden=0.90, accuracy_drop=0.05, accuracy_window=10) is None  # too few yet
    assert _which(agreements=[False] * 5 + window, golden=0.90, accuracy_drop=0.05, accuracy_window=10) == "accuracy_drop"
    assert _which(pending=0, agreements=window, golden=0.9, accuracy_drop=0.05, accuracy_window=10) is None
    # A drop of exactly accuracy_drop fires whatever its float rounding: 0.3 - 0.1 < 0.2.
    tie = [True] * 2 + [False] * 8
    assert _which(agreements=tie, golden=0.3, accuracy_drop=0.1, accuracy_window=10) == "accuracy_drop"
    assert _which(agreements=tie, golden=0.29, accuracy_drop=0.1, accuracy_window=10) is None


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
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2,
                                     "predicted": 1}


def test_metrics_edge_cases():
    assert classification_metrics([], [], ["a", "b"]).accuracy == 0.0
    m = classification_metrics([0, 0], [1, 1], ["a", "b"])  # never right: everything 0
    assert m.accuracy == 0 and m.f1 == 0
    with pytest.raises(ValueError):
        classification_metrics([0], [0, 1], ["a", "b"])


def test_deepspeed_config_cpu_and_gpu():
    cpu = build_deepspeed_config(zero_stage=2, micro_batch_size=16, world_size=2, learning_rate=1e-4,
                                 weight_decay=0.01, use_gpu=False,
                                 precision="fp32")
    assert cpu["train_batch_size"] == 32 and cpu["gradient_accumulation_steps"] == 1
    assert cpu["zero_optimization"] == {"stage": 2}
    assert cpu["bf16"]["enabled"] is False and cpu["fp16"]["enabled"] is False
    assert cpu["optimizer"]["params"]["torch_adam"] is True
    assert "scheduler" not in cpu  # the worker's own (lr_multiplier)
    gpu = build_deepspeed_config(zero_stage=3, micro_batch_size=8, world_size=4, learning_rate=1e-4,
                                 weight_decay=0.0, use_gpu=True,
                                 precision="bf16", gradient_accumulation_steps=4)
    assert gpu["bf16"]["enabled"] is True and gpu["fp16"]["enabled"] is False
    # DeepSpeed checks train_batch_size == micro batch x accumulation x world size.
    assert gpu["train_batch_size"] == 8 * 4 * 4 and gpu["gradient_accumulation_steps"] == 4
    assert gpu["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert gpu["optimizer"]["params"]["lr"] == 1e-4
    assert gpu["data_types"] == {"grad_accum_dtype": "fp32"}  # not bf16's 8-bit mantissa
    assert "data_types" not in cpu  # fp32 accumulates in fp32
    fp16 = build_deepspeed_config(zero_stage=1, micro_batch_size=8, world_size=1, learning_rate=1e-4,
                                  weight_decay=0.0, use_gpu=True, precision="fp16")
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # dynamic loss scaling
    assert fp16["bf16"]["enabled"] is False


def test_the_learning_rate_warms_up_and_decays_as_hugging_faces_linear_schedule():
    def rates(total, ratio):
        warmup = warmup_steps(total, ratio)
        return [round(lr_multiplier(step, total, warmup), 3) for step in range(total)]

    assert rates(10, 0.2) == [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert rates(5, 0.0) == [1.0, 0.8, 0.6, 0.4, 0.2]  # warmup_ratio 0: no warmup
    assert rates(1, 0.1) == [1.0]  # a lone update at the learning rate, whatever the ratio
    assert rates(2, 0.1) == [0.0, 1.0]
    assert rates(3, 1.0) == [0.0, 0.5, 1.0]  # warmup never takes the whole job

"""The DeepSpeed config dict, built by one pure function from tuneloop's training config."""

from __future__ import annotations

import math
from typing import Any


def build_deepspeed_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    world_size: int,
    learning_rate: float,
    weight_decay: float,
    use_gpu: bool,
    precision: str,
    gradient_accumulation_steps: int = 1,
) -> dict[str, Any]:
    """AdamW in ``precision`` (``recipe.resolve_precision``: bf16, fp16 with dynamic loss
    scaling, or fp32). Its learning rate follows ``lr_multiplier``, which the worker hands
    DeepSpeed as a scheduler of its own.

    The optimizer is torch's AdamW (``torch_adam``) because DeepSpeed's fused Adam needs
    CUDA; on GPU it uses the fused kernel. In bf16 and fp16 DeepSpeed keeps fp32 master
    weights in the optimizer, which is what the worker exports.

    bf16 gradients are accumulated in fp32 (``data_types.grad_accum_dtype``): left out,
    DeepSpeed 0.19 accumulates them in bf16, whose 8-bit mantissa drops a micro-batch's
    gradient smaller than 1/256 of the running sum. ZeRO stages 1-3 honour it (stage 0 refuses
    the mix; ``zero_stage_to_run`` never runs half precision there).
    """
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        # Export gathers the partitioned weights into one consolidated checkpoint.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "train_batch_size": micro_batch_size * world_size * gradient_accumulation_steps,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # loss_scale 0: dynamic, starting at 2**16 and halving on overflow (the step is skipped).
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": learning_rate,
                "weight_decay": weight_decay,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "torch_adam": not use_gpu,
            },
        },
        "steps_per_print": 10**9,  # tuneloop logs progress itself
        "wall_clock_breakdown": False,
    }
    if precision == "bf16" and zero_stage >= 1:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Hugging Face's count, ``ceil(total x ratio)``, 0 allowed, and always short of the
    whole job: a job of one update runs it at the learning rate (warmed up, it was at 0 and
    the job learned nothing)."""
    # Rounded first: 100 x 0.07 is 7.000000000000001 in floating point, which ceil makes 8.
    return max(0, min(math.ceil(round(total_steps * warmup_ratio, 9)), total_steps - 1))


def lr_multiplier(step: int, total_steps: int, warmup: int) -> float:
    """The learning rate of update ``step`` (from 0), as a share of the configured one:
    Hugging Face's linear schedule, up from 0 over ``warmup`` updates, then down towards 0
    at ``total_steps``. DeepSpeed's WarmupDecayLR, used before, took at least 2 warmup
    updates whatever warmup_ratio said (0 included): a job of 5 ran at 0, 0.5, 1, 0.67, 0.33."""
    if step < warmup:
        return step / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

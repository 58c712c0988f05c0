"""The DeepSpeed config dict, built by one pure function from tuneloop's training config."""

from __future__ import annotations

from typing import Any


def build_deepspeed_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    world_size: int,
    learning_rate: float,
    weight_decay: float,
    total_steps: int,
    warmup_ratio: float,
    use_gpu: bool,
    precision: str,
    gradient_accumulation_steps: int = 1,
) -> dict[str, Any]:
    """AdamW with linear warmup then linear decay to zero, in ``precision`` (``recipe.resolve_precision``:
    bf16, fp16 with dynamic loss scaling, or fp32); ``total_steps`` counts optimizer steps.

    The optimizer is torch's AdamW (``torch_adam``) because DeepSpeed's fused Adam needs
    CUDA; on GPU it uses the fused kernel. In bf16 and fp16 DeepSpeed keeps fp32 master
    weights in the optimizer, which is what the worker exports.
    """
    # DeepSpeed's WarmupDecayLR needs at least one warmup step and decays after it.
    warmup = max(1, int(total_steps * warmup_ratio))
    schedule = {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": learning_rate, "warmup_num_steps": warmup,
        "total_num_steps": max(total_steps, warmup + 1), "warmup_type": "linear"}}
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        # Export gathers the partitioned weights into one consolidated checkpoint.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
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
        # A lone update is at the learning rate itself: warmed up, it was at 0 and the
        # job learned nothing (the first update of a schedule is at 0, as in Hugging Face's).
        **({"scheduler": schedule} if total_steps > 1 else {}),
        "steps_per_print": 10**9,  # tuneloop logs progress itself
        "wall_clock_breakdown": False,
    }

"""What the workers of a job do together: agree on a flag or a value, and gather the
fp32 weights to export. Every function here is collective where the group has more than
one worker: every rank calls it, in the same order.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any


def consolidated_state_dict(module, rank: int, precision: str, frozen_fp32: dict[str, Any]) -> dict[str, Any]:
    """Full fp32 weights on rank 0. Trained in bf16 or fp16, a parameter's weights in the
    module are a rounded copy: the optimizer's fp32 master copy is what is exported (frozen
    parameters have none, and are exported from the fp32 copy taken when they were loaded).
    ZeRO-3's partitions are gathered one parameter at a time; every rank takes part."""
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    keys = set(module.state_dict().keys())  # persistent entries only
    state: dict[str, Any] = {}
    for name, param in module.named_parameters():
        if name in frozen_fp32 or (precision != "fp32" and param.requires_grad is False):
            if rank == 0 and name in keys:
                state[name] = frozen_fp32[name] if name in frozen_fp32 else param.data.detach().float().cpu()
            continue
        master = safe_get_full_fp32_param(param) if precision != "fp32" else None  # collective
        if master is not None:
            if rank == 0 and name in keys:
                state[name] = master.detach().to("cpu", torch.float32, copy=True).contiguous()
            continue
        partitioned = hasattr(param, "ds_id")
        ctx = deepspeed.zero.GatheredParameters([param], modifier_rank=None) if partitioned else nullcontext()
        with ctx:
            if rank == 0 and name in keys:
                state[name] = param.data.detach().to("cpu", torch.float32, copy=True).contiguous()
    if rank == 0:
        for name, buf in module.named_buffers():
            if name in keys:  # a float buffer in fp32 like the weights: DeepSpeed cast it to bf16/fp16
                dtype = torch.float32 if buf.is_floating_point() else buf.dtype
                state[name] = buf.detach().to("cpu", dtype, copy=True)
    return state


def on_every_rank(flag: bool, device) -> bool:
    """Whether ``flag`` holds on every rank. A job whose workers landed on GPUs of two kinds
    (one without bf16) trains in one precision, fp16, on all of them: ranks in different
    precisions would not agree on their collectives' tensors, and a rank refusing bf16 alone
    left the others waiting for it."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def from_rank_zero(value: float, device) -> float:
    """Rank 0's ``value`` on every rank: decisions that lead to collective calls must not
    hang on a near-tie that two ranks' arithmetic resolves differently."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def without_shm_all_reduce() -> None:
    """On CPU, DeepSpeed's process-group setup compiles its shared-memory all-reduce, a C++
    extension (measured: 2 minutes on 2 cores, at a machine's first job and again for each
    virtualenv path), which only ``inference_all_reduce`` uses; training's collectives go
    through gloo either way. Marked unavailable, the extension is never built.
    (``deepspeed.ops.__compatible_ops__`` is probed once and kept, so the mark holds.)"""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

"""A micro-batch's loss from passes of rows of about one length, each padded to its own longest.

A batch of texts is padded to its longest: in random batches of 32 SST-2 train texts cut at
64 tokens, two thirds of the tokens computed were padding. ``training.group_by_length``
removes it by choosing other batches, which changes what each step learns (it scored lower
wherever it was compared). Passes keep the batch: its rows in length order are cut where
serving cuts them (``forward_passes``), each pass runs forward on its rows at its own width,
and the passes' losses are weighted by what each head's mean is over (rows, or tagged tokens
for a tagger) and summed, so that one backward gives the gradient of the whole batch padded
once, up to float rounding and dropout's draws. On a CPU only, where a forward pass costs
its tokens; on a GPU a pass costs its launches as much (not measured here), and a batch
runs whole. DeepSpeed's engine takes several forwards before one backward at every ZeRO
stage on one worker (tests/integration/test_deepspeed_bf16.py); with several workers,
stages 0-2 reduce each gradient once per backward, but stage 3 gathers the weights at every
forward, so the loop runs whole batches there. Each forward's hooks open a backward in
DeepSpeed's bookkeeping (``backward_active_depth`` counts up by the extra passes); nothing
the loop uses reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tuneloop.core.batching_policy import forward_passes

# (the pass's model inputs, its targets, its rows' index in the batch or None for all) ->
# (its loss: the head's mean over its rows or tokens, what that mean is over)
PassLoss = Callable[[dict[str, Any], Any, Any], tuple[Any, int]]


def passes_of(inputs: dict[str, Any], enabled: bool) -> list[list[int]] | None:
    """The micro-batch's rows in passes by length, or None where it runs as one pass."""
    if not enabled:
        return None
    lengths = inputs["attention_mask"].sum(-1).tolist()
    passes = forward_passes(lengths, len(lengths))
    return passes if len(passes) > 1 else None


def targets_counted(target: Any) -> int:
    """What a head's mean loss is over: every element of a float target (a multi-label
    row's labels), the tags that are not ignored (-100) of a tagger's, a row's class."""
    if target.dtype.is_floating_point:
        return int(target.numel())
    return int((target != -100).sum())


def batch_loss(inputs: dict[str, Any], target: Any, passes: list[list[int]] | None, loss_of: PassLoss) -> Any:
    """The micro-batch's loss: ``loss_of`` on the whole batch, or on each of ``passes`` at
    its own width (a tagger's targets, one per token, cut with it), weighted by what each
    pass's mean is over."""
    import torch

    if passes is None:
        return loss_of(inputs, target, None)[0]
    mask = inputs["attention_mask"]
    per_token = not target.dtype.is_floating_point and target.dim() == 2
    parts = []
    for rows in passes:
        index = torch.tensor(rows, device=mask.device)
        width = int(mask[index].sum(-1).max())
        part_target = target[index][:, :width].contiguous() if per_token else target[index]  # heads view(-1) it
        parts.append(loss_of({k: v[index, :width].contiguous() for k, v in inputs.items()}, part_target, index))
    counted = sum(n for _, n in parts)
    if not counted:  # nothing to learn from in the batch: the zeros the head's loss gave
        return sum(loss for loss, _ in parts)
    return sum(loss.float() * (n / counted) for loss, n in parts)  # in bf16 the weights would round

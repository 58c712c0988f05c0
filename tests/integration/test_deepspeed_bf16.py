"""DeepSpeed itself, run on the CPU accelerator in bf16 with the config tuneloop builds: the
gradients of an accumulation group add up in fp32. No GPU here, so this is the one place the
bf16 path's accumulation runs for real (its process: DeepSpeed's process group stays apart
from the tests' Ray)."""

from __future__ import annotations

import subprocess
import sys

from tuneloop.serving.fast_path import free_port

SCRIPT = r'''
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from deepspeed.utils import safe_get_full_grad
from tuneloop.training.deepspeed_config import build_deepspeed_config
from tuneloop.training.collectives import without_shm_all_reduce

without_shm_all_reduce()  # as a CPU job's worker does: no C++ build (40 s of this test in a fresh clone)
deepspeed.init_distributed(dist_backend="gloo")
n = 64
for stage, ours in [(1, True), (2, True), (3, True), (2, False)]:
    config = build_deepspeed_config(zero_stage=stage, micro_batch_size=1, world_size=1, learning_rate=1e-3,
                                    weight_decay=0.0, use_gpu=False, precision="bf16", gradient_accumulation_steps=n)
    if not ours:
        config.pop("data_types")
    model = torch.nn.Linear(1, 1, bias=False)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    # d(loss)/dw is the input: one micro-batch of 1, then 63 of 1/512 (each under half a
    # bf16 step of the running sum, 1/256): the group's gradient is 1 + 63/512 = 1.123.
    for i in range(n):
        engine.backward(engine(torch.full((1, 1), 1.0 if i == 0 else 1 / 512, dtype=torch.bfloat16)).float().sum())
        if i == n - 1:
            print("SUM", stage, ours, float(safe_get_full_grad(engine.module.weight).float().sum()) * n, flush=True)
        engine.step()
'''


def test_bf16_gradients_accumulate_in_fp32_at_every_zero_stage():
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(free_port())], capture_output=True, text=True, timeout=300)
    sums = {(int(s), o == "True"): float(v) for line in run.stdout.splitlines() if line.startswith("SUM ")
            for _, s, o, v in [line.split()]}
    assert len(sums) == 4, run.stdout[-2000:] + run.stderr[-4000:]
    for stage in (1, 2, 3):
        assert abs(sums[stage, True] - (1 + 63 / 512)) < 0.005, sums  # every micro-batch counted
    assert sums[2, False] == 1.0, sums  # DeepSpeed's own default, bf16: the 63 small ones were lost


PASSES_SCRIPT = r'''
import os, sys, torch, transformers
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from deepspeed.utils import safe_get_full_grad
from tuneloop.training.deepspeed_config import build_deepspeed_config
from tuneloop.training.length_passes import batch_loss, passes_of, targets_counted
from tuneloop.training.collectives import without_shm_all_reduce

without_shm_all_reduce()
deepspeed.init_distributed(dist_backend="gloo")
tokenizer = transformers.AutoTokenizer.from_pretrained(sys.argv[2])
texts = ["ok", "the film was " + "great and " * 12, "fine", "the show was " + "long and " * 12] * 2
inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
target = torch.tensor([0, 1, 1, 0] * 2)
passes = passes_of(inputs, True)
print("PASSES", len(passes or []), flush=True)
for stage in (0, 1, 2, 3):
    grads = []
    for cut in (None, passes):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[2]).eval()  # no dropout
        config = build_deepspeed_config(zero_stage=stage, micro_batch_size=8, world_size=1, learning_rate=1e-3,
                                        weight_decay=0.0, use_gpu=False, precision="fp32", gradient_accumulation_steps=1)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

        def loss_of(part, part_target, index):
            return engine(**part, labels=part_target).loss, targets_counted(part_target)

        engine.backward(batch_loss(inputs, target, cut, loss_of))
        grads.append(torch.cat([safe_get_full_grad(p).flatten().float() for p in engine.module.parameters()]))
    print("DIFF", stage, float((grads[0] - grads[1]).abs().max()), float(grads[0].abs().max()), flush=True)
'''


def test_a_batch_in_passes_by_length_gives_deepspeeds_gradient_of_the_whole_batch_at_every_zero_stage(tmp_path):
    """The training loop runs a micro-batch's passes (``length_passes.py``) through the engine's
    forward several times before one backward: the gradient DeepSpeed holds must be the whole
    padded batch's, at stages 0 to 3 (one worker)."""
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny", ["negative", "positive"])
    run = subprocess.run([sys.executable, "-c", PASSES_SCRIPT, str(free_port()), model],
                         capture_output=True, text=True, timeout=300)
    lines = {line.split()[0] + line.split()[1]: line.split() for line in run.stdout.splitlines()
             if line.startswith(("PASSES", "DIFF"))}
    assert int(next(v for k, v in lines.items() if k.startswith("PASSES"))[1]) >= 2, run.stdout + run.stderr[-4000:]
    for stage in range(4):
        _, _, diff, largest = lines[f"DIFF{stage}"]
        assert float(largest) > 0 and float(diff) <= 1e-4 * float(largest) + 1e-7, (stage, diff, largest)

"""The config's training sections: ``training`` (the recipe, per model or as defaults), ``gate``,
``optimize`` (artifacts and their parity), ``trigger`` and ``quarantine``. Pure.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tuneloop.core.deploy_config import Section
from tuneloop.core.resources import RAY_MIN_AMOUNT, custom_resources
from tuneloop.core.runtimes import ArtifactName



class TrainingConfig(Section):
    epochs: int = Field(default=3, ge=1, le=1000)
    learning_rate: float = Field(default=5e-5, gt=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0, lt=1)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    batch_size: int = Field(default=16, ge=1, le=4096, description="per worker")
    max_length: int = Field(default=128, ge=8, le=8192)
    group_by_length: bool = Field(default=False, description=(
        "batches of rows of about one length (tokens), the batches' order shuffled every epoch: a batch is "
        "padded to its longest row, and random batches of short texts are mostly padding"))
    passes_by_length: bool = Field(default=True, description=(
        "on a CPU, each micro-batch's rows run forward in passes of about one length, each padded to its own "
        "longest, and one backward over their weighted losses: the same batch and gradient as one padded pass, "
        "with less padding computed (training/length_passes.py); not at ZeRO-3 with several workers"))
    zero_stage: Literal[0, 1, 2, 3] = 2
    num_workers: int = Field(default=2, ge=1, le=1024)
    use_gpu: bool = False
    # At least Ray's precision: finer amounts passed here and Ray refused them at the job's start.
    cpus_per_worker: float = Field(default=1.0, ge=RAY_MIN_AMOUNT, description="Ray CPUs each training worker asks for")
    gpus_per_worker: float = Field(
        default=1.0, ge=RAY_MIN_AMOUNT,
        description="with use_gpu: GPUs each worker asks for; below 1 (one worker only) it shares a GPU with "
                    "serving replicas (serving.num_gpus_per_replica)")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each worker also asks for (a node type): workers go only to nodes "
                    "that offer them")
    resource_wait_s: float = Field(
        default=30.0, ge=0,
        description="how long a job waits for busy CPUs/GPUs to free up (or an autoscaler to add them) before "
                    "it fails saying what to change")
    eval_fraction: float = Field(
        default=0.2, ge=0, lt=1,
        description="newest share of a job's fresh feedback kept back to compare candidate and production; "
                    "the next job trains on it",
    )
    replay_ratio: float = Field(  # bounded: .inf passed, and every job after v1 failed converting it to rows
        default=1.0, ge=0, le=1000, description="replay rows (seed and earlier feedback) per fresh feedback row"
    )
    max_rows_per_job: int = Field(default=20_000, ge=1, description=(
        "fresh plus replay rows a job trains on, at most; at most as many are kept back for the gate, and as many "
        "for early stopping"))
    reservoir_size: int = Field(
        default=10_000, ge=0, description="earlier feedback kept as a uniform sample for replay"
    )
    golden_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="share of the seed frozen as the golden set at v1 (no golden_dataset)"
    )
    golden_max_rows: int = Field(default=2000, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps, for smoke runs")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="numpy's and torch's generators take 0..2^32-1")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="auto: bf16 on a GPU that has it, fp16 with loss scaling on one that does not, fp32 on CPU; "
                    "the exported weights are always the fp32 master copy",
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="micro-batches per optimizer step (effective batch = batch_size x this x workers)"
    )
    freeze_layers: int = Field(
        default=0, ge=0, le=1000, description="freeze the embeddings and the lowest N encoder layers; 0 = train all"
    )
    feature_extraction: bool = Field(default=False, description="freeze the whole encoder and train the head only")
    dropout: float | None = Field(
        default=None, ge=0, lt=1, description="dropout for every dropout setting of the model's config; null = the checkpoint's"
    )
    early_stopping_patience: int | None = Field(
        default=2, ge=1,
        description="stop after this many epochs without a lower loss on the validation rows (the eval_fraction of "
                    "fresh feedback just before the gate's kept-back rows; at v1 that share of the seed) and keep the best "
                    "epoch's weights; off without such rows; null = off",
    )
    early_stopping_min_delta: float = Field(default=0.0, ge=0, description="a loss this much lower counts as better")

    @field_validator("gpus_per_worker")
    @classmethod
    def _one_gpu_a_worker(cls, v: float) -> float:
        if v > 1:
            raise ValueError(f"gpus_per_worker {v:g}: a worker trains on one GPU (a DeepSpeed rank has one device), "
                             "so the others would sit idle; for more GPUs, raise num_workers")
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources_only(cls, v: dict[str, float]) -> dict[str, float]:
        return custom_resources(v, "resources_per_worker", "cpus_per_worker and use_gpu/gpus_per_worker")

    @model_validator(mode="after")
    def _keys_agree(self) -> TrainingConfig:
        if self.max_rows_per_job < self.num_workers:
            raise ValueError(f"max_rows_per_job {self.max_rows_per_job} is fewer than num_workers {self.num_workers}: "
                             "a worker would have no row to train on")
        if self.use_gpu and self.num_workers > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError(
                f"gpus_per_worker {self.gpus_per_worker:g} with num_workers {self.num_workers}: two DeepSpeed ranks "
                "could land on one GPU, which NCCL refuses; use whole GPUs, or num_workers: 1 to share a GPU "
                "with serving")
        if self.precision in ("bf16", "fp16") and not self.use_gpu:
            raise ValueError(
                f"precision {self.precision!r} needs use_gpu: true; on CPU training runs in fp32 "
                "(set precision: auto or fp32)"
            )
        return self


class TrainingDefaults(TrainingConfig):
    """The top-level ``training:`` section: each key is a default that a model's own
    ``training:`` may override, so the checks across keys are made on what each model trains
    with (``TuneloopConfig.training_for``), not on the section alone: ``precision: bf16``
    here with ``use_gpu: true`` in every model is a valid config."""

    @model_validator(mode="after")
    def _keys_agree(self) -> TrainingDefaults:
        return self


class GateConfig(Section):
    """What a candidate must show to replace production (``cluster/core/gate.py``)."""

    golden_margin: float = Field(
        default=0.01, ge=0, le=1, description="the gate metric may fall this much on the golden set, no more"
    )
    class_recall_margin: float = Field(
        default=0.05, ge=0, le=1, description="any class's recall on the golden set may fall this much, no more"
    )
    alpha: float = Field(default=0.05, gt=0, lt=1,
                         description="level of the one-sided tests: a class's recall drop, a win on fresh feedback")
    min_fresh_rows: int = Field(
        default=30, ge=1, description="fresh rows from which McNemar's test of a win is recorded (a candidate must "
                                      "not lose there at any number of rows)"
    )


class OptimizeConfig(Section):
    """Optimized artifacts of every version (``tuneloop optimize``; ``cluster/core/runtimes.py``):
    built by the job before its version takes traffic, or later for an existing version."""

    enabled: bool | None = Field(default=None, description=(
        "the job builds the artifacts of each version it publishes; None: when replicas serve on CPUs (the "
        "artifacts are CPU runtimes: a GPU replica serves PyTorch in bf16 or fp16)"))
    runtimes: list[ArtifactName] = Field(
        default_factory=lambda: ["onnx", "onnx-int8", "torch-bf16"],
        description="artifacts to build: ONNX, its int8 variant, and PyTorch in bf16 (on a CPU with native bf16)")
    min_agreement: float = Field(
        default=0.99, ge=0, le=1, description="share of golden rows an artifact must answer as PyTorch does")
    max_accuracy_drop: float = Field(
        default=0.005, ge=0, le=1, description="an artifact's golden accuracy may fall this much below PyTorch's")
    parity_max_rows: int = Field(default=2000, ge=1, description="golden rows the parity check reads, at most")
    int8_smoothing: float = Field(
        default=0.8, ge=0, le=1,
        description="SmoothQuant's alpha before int8: how much of each activation channel's range moves into the "
                    "weights (0: none)")
    calibration_rows: int = Field(
        default=256, ge=1, description="texts that calibrate the smoothing: the version's training rows, else golden")
    speed_batch_size: int = Field(default=32, ge=1, le=1024, description="batch of the texts/s measured per runtime")
    speed_seconds: float = Field(default=3.0, gt=0, le=600, description="how long each runtime's texts/s is measured (and half as long, one text at a time)")
    measure_on_replicas: bool = Field(default=True, description=(
        "under serving.runtime auto, a CPU replica whose hardware class has no speed for an artifact of its "
        "version that passed (the job ran elsewhere) measures it and PyTorch, speed_seconds each, before it "
        "serves the version, and adds the speeds for the next replicas of its class; off: it chooses among what "
        "was measured, PyTorch where nothing was"))


class TriggerConfig(Section):
    """When a retrain starts by itself (``cluster/core/triggers.py``); an admin can always."""

    every_n_feedback: int = Field(
        default=0, ge=0, description="retrain after this many new feedback records; 0 = off"
    )
    interval_s: float | None = Field(
        default=None, gt=0, description="retrain this often when there is new feedback; null = off"
    )
    accuracy_drop: float | None = Field(
        default=None, gt=0, le=1,
        description="retrain when users agree with production this much less often than its golden accuracy",
    )
    accuracy_window: int = Field(default=200, ge=1, description="production's last predictions with feedback to judge by")


class QuarantineConfig(Section):
    """Which feedback keys a job holds out of training (``cluster/core/quarantine.py``)."""

    enabled: bool = True
    min_rows: int = Field(default=20, ge=1, description="predictions a key must have judged before it can be flagged")
    max_gap: float = Field(
        default=0.4, gt=0, le=1,
        description="flag a key agreeing with production this much less often than the median of production's "
                    "golden accuracy and the other keys that judged min_rows",
    )
    min_shared_texts: int = Field(default=10, ge=1, description="texts a key shares with other keys before that counts")
    min_peer_agreement: float = Field(
        default=0.5, ge=0, le=1, description="flag a key giving other keys' label on fewer of its shared texts"
    )

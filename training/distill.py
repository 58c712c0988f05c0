"""Distillation (``ModelConfig.distill``): a student learns from a teacher's soft labels.

``teacher_of`` finds a student's teacher for a job; three pieces run where torch runs:

- ``with_teacher_logits``: the teacher's production version scores every training row
  once, as a Ray Data batch-inference stage before the workers start (an actor holding the
  teacher; on a GPU cluster it takes a GPU). The workers read the logits as a column, so the
  teacher costs one forward pass per row, not one per row per epoch.
- ``keep_layers``: a student made from the teacher itself (``distill.student_layers``).
- ``distillation_loss``: Hinton et al.'s loss, the teacher's softened scores against the
  student's, mixed with the rows' own labels.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from tuneloop.core.config import DistillConfig, TuneloopConfig
from tuneloop.core.evaluation import EvalMetrics
from tuneloop.core.gate import TeacherEvidence
from tuneloop.core.runtimes import holds_to, native_bf16
from tuneloop.core.tasks import Task, teacher_labels_problem
from tuneloop.store.registry import Registry
from tuneloop.training.model_files import ModelFiles

TEACHER_COLUMN = "teacher_logits"
SCORE_BATCH_SIZE = 64
_ROW, _DTYPE = "_teacher_row", "_teacher_dtype"  # the scoring's own columns, gone from what it returns


@dataclass
class Teacher:
    """A student's teacher for one job: the teacher model's production version when the job
    started (a later promotion of the teacher does not change what this job learns from)."""

    model: str
    version: str
    files: ModelFiles  # the teacher version's, fetched where they are read
    metrics: EvalMetrics | None
    settings: DistillConfig
    bf16_passed: bool = False  # the version's torch-bf16 artifact passed its parity check
    scoring_s: float = 0.0
    scoring_dtype: str = ""

    @property
    def student_layers(self) -> int | None:
        return self.settings.student_layers

    def loop_config(self, first_version: bool) -> dict[str, Any]:
        """What the workers need: the loss's settings, and at v1 the layers to keep."""
        return {"temperature": self.settings.temperature, "alpha": self.settings.alpha,
                "student_layers": self.settings.student_layers if first_version else None}

    def evidence(self) -> TeacherEvidence | None:
        if self.metrics is None:
            return None
        return TeacherEvidence(model=self.model, version=self.version, golden=self.metrics,
                               max_gap=self.settings.max_gap)

    def record(self, first_version: bool) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, **self.loop_config(first_version),
                "max_gap": self.settings.max_gap, "scoring_s": round(self.scoring_s, 2),
                "scoring_dtype": self.scoring_dtype,
                "teacher_metrics": self.metrics.model_dump() if self.metrics else None}


def teacher_of(cfg: TuneloopConfig, registry: Registry, model: str) -> Teacher | None:
    """Model ``model``'s teacher, if it is a student; fails when the teacher has no production."""
    settings = cfg.model(model).distill
    if settings is None:
        return None
    version = registry.production(settings.teacher)
    if version is None:
        raise ValueError(f"{model} is distilled from {settings.teacher}, which has no production version yet: "
                         f"train it first (tuneloop train {settings.teacher})")
    manifest = registry.manifest(settings.teacher, version)
    student = cfg.model(model)
    if problem := teacher_labels_problem(student.task, student.labels, settings.teacher, version, manifest.labels):
        raise ValueError(f"{model}: {problem}")  # said here, not as an actor's death inside Ray Data's scoring
    # As serving judges it: an artifact the config still builds, by today's parity limits.
    bf16 = manifest.optimization.artifacts.get("torch-bf16") if manifest.optimization else None
    limits = cfg.optimize.min_agreement, cfg.optimize.max_accuracy_drop
    passed = bf16 is not None and "torch-bf16" in cfg.optimize.runtimes and holds_to(bf16.parity, limits).passed
    return Teacher(model=settings.teacher, version=version,
                   files=ModelFiles.of_version(registry, settings.teacher, version), metrics=manifest.metrics,
                   settings=settings, bf16_passed=passed)


class _TeacherScorer:
    """A Ray Data actor: the teacher, and a batch's logits in the student's label order.
    In bf16 when ``bf16`` (its bf16 answers passed the parity check) and this node computes
    bf16 natively (a GPU, or a CPU with AVX512-BF16 or AMX, as ``serving.loaded_models.cpu_class``
    tells): it scored 3.5x as many rows a second as fp32 did, both longest text first, with
    MPNet-base on this machine's 2 threads; 99.9% of the rows' top class agreed, and no
    softened score moved by more than 0.034 (``benchmarks/teacher_scoring_bench.py``)."""

    def __init__(self, files: dict, auto_class: str, head: list[str], max_length: int, use_gpu: bool,
                 bf16: bool = False):
        import platform

        import torch
        import transformers

        path = ModelFiles(**files).local_path()  # on the actor's node
        self.device = "cuda" if use_gpu else "cpu"
        # A GPU without bf16 arithmetic (a T4, a V100) emulates it, slower than fp32; so does
        # a CPU without AVX512-BF16 or AMX (runtimes.native_bf16).
        native = bf16 and (torch.cuda.is_bf16_supported(including_emulation=False) if use_gpu else native_bf16(
            platform.machine(), torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported(),
            torch.ops.mkldnn._is_mkldnn_bf16_supported()))
        self.dtype = "bf16" if native else "fp32"
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.model = getattr(transformers, auto_class).from_pretrained(
            path, dtype=torch.bfloat16 if self.dtype == "bf16" else torch.float32).to(self.device).eval()
        id2label = {int(i): label for i, label in self.model.config.id2label.items()}
        theirs = [id2label[i] for i in range(len(id2label))]
        if sorted(theirs) != sorted(head):
            raise ValueError(f"the teacher at {path} answers {theirs}, the student {head}: distillation needs the same labels")
        self.order = [theirs.index(label) for label in head]
        self.max_length = min(max_length, self.tokenizer.model_max_length)  # a job saved the model's limit there

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        enc = self.tokenizer([str(t) for t in batch.column("text").to_pylist()], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits.float()
        logits = logits[:, self.order].cpu().numpy().astype(np.float32)
        # A plain fixed-size list column (not Ray Data's tensor extension type): the workers
        # read it as lists without Ray Data.
        column = pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel()), logits.shape[1])
        return batch.append_column(TEACHER_COLUMN, column).append_column(_DTYPE, pa.array([self.dtype] * len(column)))


def with_teacher_logits(train: pa.Table, teacher: Teacher, task: Task, max_length: int, use_gpu: bool,
                        cpus: float, gpus: float) -> pa.Table:
    """``train`` with the teacher's logits per row (scored once, read every epoch), in its
    order; ``teacher`` records the seconds the scoring took and its dtype. The scorer asks
    for what one training worker asks (``cpus``, and ``gpus`` with ``use_gpu``): the job
    checked those were free, and a worker sharing a GPU with serving (``gpus_per_worker``
    below 1) left its scorer waiting for a whole GPU."""
    t0 = time.perf_counter()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # they flood the server's log
    context.print_on_execution_start = False
    # Its "Dataset ... execution finished" line at info: the job logs its own. Put back after.
    executor = logging.getLogger("ray.data._internal.execution.streaming_executor")
    level = executor.level
    executor.setLevel(max(level, logging.WARNING))
    try:
        scored = _scored(train, teacher, task, max_length, use_gpu, cpus, gpus)
    finally:
        executor.setLevel(level)
    teacher.scoring_s = time.perf_counter() - t0
    teacher.scoring_dtype = ",".join(sorted(set(scored.column(_DTYPE).to_pylist())))
    return scored.drop_columns([_DTYPE])


def _scored(train: pa.Table, teacher: Teacher, task: Task, max_length: int, use_gpu: bool, cpus: float,
            gpus: float) -> pa.Table:
    """The rows scored longest text first, so that a batch's texts are of a length and few
    of its tokens padding (2.5x the rows a second of the job's order, SST-2 texts), then put
    back in ``train``'s order."""
    rows = train.append_column(_ROW, pa.array(range(train.num_rows), pa.int64()))
    by_length = rows.take(pc.array_sort_indices(pc.utf8_length(rows.column("text")), order="descending"))
    with warnings.catch_warnings():
        # max_restarts goes through ray_remote_args, deprecated in Ray 2.60 with no named
        # parameter for it yet: the warning reached every student job's console.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        scored = ray.data.from_arrow(by_length).map_batches(
            _TeacherScorer, batch_size=SCORE_BATCH_SIZE, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cpus, num_gpus=gpus if use_gpu else 0,
            # Not restarted: a scorer that died fails the job, which says so. With restarts Ray
            # logged an error line at every job (its constructor arguments in the object store
            # might be gone by a restart, ray-project/ray#53727).
            max_restarts=0,
            fn_constructor_kwargs={"files": teacher.files.model_dump(), "auto_class": task.auto_class,
                                   "head": task.head_labels(), "max_length": max_length, "use_gpu": use_gpu,
                                   "bf16": teacher.bf16_passed},
        )
    scored = pa.concat_tables(ray.get(scored.to_arrow_refs()))
    return scored.take(pc.sort_indices(scored, [(_ROW, "ascending")])).drop_columns([_ROW])


def keep_layers(model, keep: list[int]) -> None:
    """Cut ``model``'s encoder to the layers ``keep`` (indices into its stack), in place: the
    first module list of the base model as long as its config's ``num_hidden_layers`` is the
    stack (BERT's ``encoder.layer``, DistilBERT's ``transformer.layer``)."""
    import torch

    total = model.config.num_hidden_layers
    stack = next(((name, m) for name, m in model.base_model.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == total), None)
    if stack is None:
        raise ValueError(f"cannot find the {total} encoder layers of {type(model).__name__} to keep {keep} of")
    name, layers = stack
    parent = model.base_model.get_submodule(name.rpartition(".")[0]) if "." in name else model.base_model
    setattr(parent, name.rpartition(".")[2], torch.nn.ModuleList([layers[i] for i in keep]))
    for i, layer in enumerate(getattr(parent, name.rpartition(".")[2])):
        for sub in layer.modules():  # attention modules that index a cache by their layer
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = i
    # Configs with a type per layer (ModernBERT's attention pattern, in transformers 5) are
    # validated against num_hidden_layers on assignment: cut the list first.
    if isinstance(getattr(model.config, "layer_types", None), list | tuple):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.config.num_hidden_layers = len(keep)
    _as_built_in_place(model, name, getattr(parent, name.rpartition(".")[2]))


def _as_built_in_place(model, stack: str, kept) -> None:
    """Give each kept layer the modules a model of the cut config builds in its new place.
    A family may build a layer by its place: ModernBERT's first has no attention norm (the
    embeddings' norm comes just before it), so a student of its last layer alone trained
    with a norm the saved version reloaded without (dropped as an unexpected weight): the
    version served was not the one the gate passed. Built on the meta device: no weights."""
    import torch

    with torch.device("meta"):
        built = type(model)(model.config).base_model.get_submodule(stack)
    for layer, fresh in zip(kept, built, strict=True):
        for name, module in fresh.named_modules():
            if name and isinstance(module, torch.nn.Identity) and not isinstance(layer.get_submodule(name),
                                                                                 torch.nn.Identity):
                layer.set_submodule(name, torch.nn.Identity())


def distillation_loss(student_logits, teacher_logits, targets, labelled, task: Task, temperature: float,
                      alpha: float):
    """Per row, ``alpha`` x the soft-label loss + (1 - alpha) x the hard loss on the row's own
    ``targets``; a row without a label (``labelled`` False: a transfer text) has the soft
    loss alone. The mean over the rows. ``labelled`` None: every row has its label.

    The soft loss compares the student's scores with the teacher's, both softened by
    ``temperature``: cross-entropy for one answer per text (KL divergence plus a constant),
    binary cross-entropy per label for multi-label. It is scaled by temperature squared,
    which keeps its gradients the size of the hard loss's (Hinton et al., 2015). The hard
    loss is the one the model's head computes (cross-entropy, or binary cross-entropy per
    label), taken per row here so that the rows without labels can be left out of it."""
    import torch.nn.functional as F

    logits = student_logits.float()
    s, t = logits / temperature, teacher_logits.float() / temperature
    if task.activation == "sigmoid":
        soft = F.binary_cross_entropy_with_logits(s, t.sigmoid(), reduction="none").mean(-1)
        hard = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").mean(-1)
    else:
        soft = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
        hard = F.cross_entropy(logits, targets, reduction="none")
    soft = soft * temperature**2
    mixed = alpha * soft + (1 - alpha) * hard
    return (mixed if labelled is None else mixed.where(labelled, soft)).mean()

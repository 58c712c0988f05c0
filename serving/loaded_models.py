"""A version ready for batched forward passes, on one runtime: PyTorch (fp32, or bf16 on a
CPU with native bf16), or an ONNX artifact run by ONNX Runtime (``cluster/core/runtimes.py``
says which serves).

Both tokenize the same way and turn scores into answers the same way (the task's); only the
forward pass differs. Scores are read by the checkpoint's own ``id2label`` (the order the
head was trained in), never by position in the config.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tuneloop.core.batching_policy import forward_passes
from tuneloop.core.errors import InputRejected, NonFiniteScores
from tuneloop.core.runtimes import native_bf16
from tuneloop.core.tasks import Task


# The longest single row (window) the lone-text runtime answers (``choose_lone_runtime``).
# One SST-2 dev text alone, MiniLM-L6, one thread, ms for bf16 / fp32 ONNX / int8: 11 tokens
# 10.8 / 6.0 / 3.9, 26 tokens 13.2 / 9.8 / 7.4, 50 tokens 17.2 / 16.7 / 12.2, 97 tokens
# 25.7 / 28.4 / 20.4, 191 tokens 37.8 / 57.2 / 46.4: past a few dozen tokens bf16's arithmetic
# wins again, as it does at a batch of two short texts.
LONE_MAX_TOKENS = 32


class LabelMismatch(ValueError):
    """A version's checkpoint names other labels than the config: serving it would
    mislabel answers (or fail on every predict), so it is refused at load."""


def checkpoint_labels(id2label: dict, head_labels: list[str], version: str) -> list[str]:
    """The head's labels in the checkpoint's own output order, checked against the set the
    model's task expects (``Task.head_labels``, from the config)."""
    labels = [id2label[i] for i in sorted(id2label, key=int)]
    if sorted(labels) != sorted(head_labels):
        raise LabelMismatch(
            f"version {version}'s checkpoint has labels {labels}, the config {head_labels}; refusing to serve it"
        )
    return labels


def cpu_class() -> str:
    """This CPU's device name in a hardware class: ``cpu-bf16`` where oneDNN has native bf16
    arithmetic (AVX512-BF16 or AMX), where ``torch-bf16`` runs 1.6-1.8x fp32 (measured on an
    EPYC with AVX512-BF16); ``cpu`` elsewhere, where bf16 is emulated and slower than fp32."""
    import platform

    import torch

    native = native_bf16(platform.machine(), torch.cpu._is_avx512_bf16_supported(),
                         torch.cpu._is_amx_tile_supported(), torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return "cpu-bf16" if native else "cpu"


class LoadedModel:
    """One version's tokenizer and PyTorch weights: bf16 on a GPU, fp32 on a CPU unless
    ``bf16`` (the ``torch-bf16`` runtime). On a GPU only when ``gpu`` (the replica was given
    one, ``serving.num_gpus_per_replica``): Ray 2.60 leaves ``CUDA_VISIBLE_DEVICES`` as it is
    for an actor that asked for no GPU, so a CPU replica on a GPU host saw every GPU and
    took GPU 0 behind Ray's back."""

    runtime = "torch"
    lone: LoadedModel | None = None  # the same version on the runtime quickest at one text alone, if another
    warm_batch: tuple[float, int] | None = None  # (seconds, units of work) of its warm-up batch, once run
    # Rows a forward pass takes at most: a token classifier reads a long text in many windows,
    # and a batch of 32 texts of 2,000 characters went through one pass as 672 rows.
    max_rows = 64
    # Passes padded to their own longest row (``_passes``); the benchmarks' bare loop turns it
    # off to run the plain model, padded whole, beside tuneloop's.
    passes_by_length = True

    def __init__(self, path: str, version: str, task: Task, max_length: int, bf16: bool = False,
                 gpu: bool = False):
        import transformers

        self.version, self.task, self.bf16, self.gpu = version, task, bf16, gpu
        if bf16:
            self.runtime = "torch-bf16"
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        # The tokens the model takes, which the job that made the version saved in its
        # tokenizer: a longer batch failed indexing the model's position table (a 500).
        self.max_length = min(max_length, self.tokenizer.model_max_length)
        self.pads_right = self.tokenizer.padding_side == "right"
        self._load_weights(path)

    def _load_weights(self, path: str) -> None:
        import torch
        import transformers

        self.device = torch.device("cuda" if self.gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":  # a GPU without bf16 (T4, V100) emulates it slowly: fp16 there
            # Not torch's default, which counts emulation (every CUDA GPU), as support.
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        else:
            dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.passes_by_length = self.device.type == "cpu"
        auto_class = getattr(transformers, self.task.auto_class)
        self.model = auto_class.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.model.config.use_cache = False  # a decoder's (GPT-2's) key-value cache is for generating, not scoring
        self.head = checkpoint_labels(self.model.config.id2label, self.task.head_labels(), self.version)
        # What holding this version costs the replica: its weights and buffers, as loaded;
        # activations come and go with each batch.
        self.weight_bytes = sum(t.numel() * t.element_size()
                                for t in (*self.model.parameters(), *self.model.buffers()))

    def _forward(self, enc) -> Any:
        """Activated scores (a float tensor on the CPU) of a tokenized batch."""
        import torch

        enc = enc.to(self.device)
        with torch.inference_mode():
            logits = self.model(**enc).logits.float()
            return (logits.sigmoid() if self.task.activation == "sigmoid" else logits.softmax(-1)).cpu()

    def scores(self, texts: list[str], tokenizer_options: dict[str, Any]) -> tuple[Any, dict[str, list], int, int]:
        """(activated scores, the task's encoding, real tokens, padded tokens) of ``texts``."""
        import torch

        try:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt", **tokenizer_options)
        except Exception as e:  # noqa: BLE001 - the tokenizer's errors come in many types
            raise InputRejected(f"the tokenizer cannot take this input ({type(e).__name__}: {e})") from None
        mask = enc["attention_mask"]
        if mask.shape[-1] == 0 or bool((mask.sum(-1) == 0).any()):
            # A tokenizer that adds no special tokens (GPT-2's) gives "" none: the forward pass
            # then failed reshaping an empty tensor, a 500.
            raise InputRejected("a text has no tokens this model reads (empty, or only characters its tokenizer drops)")
        lengths = mask.sum(-1).tolist()
        tokens, passes = sum(lengths), self._passes(lengths, mask.shape[-1])
        padded = sum(len(rows) * width for rows, width in passes)
        encoding = self.task.encoding_for(enc)  # and enc keeps only the model's inputs
        lone = self.lone is not None and mask.shape[0] == 1 and mask.shape[-1] <= LONE_MAX_TOKENS
        probs = (self.lone if lone else self)._forward_passes(enc, passes)  # the same version's tokenizer and head
        if lone and not bool(torch.isfinite(probs).all()):  # int8's scales on one text: the version's own runtime
            probs = self._forward_passes(enc, passes)
        if not bool(torch.isfinite(probs).all()):
            raise NonFiniteScores("the model produced non-finite scores for this input")
        return probs, encoding, tokens, padded

    def _passes(self, lengths: list[int], width: int) -> list[tuple[list[int], int]]:
        """(rows, the tokens each is padded to) of each forward pass over a batch of rows of
        ``lengths`` real tokens padded to ``width``: by length (``forward_passes``), each
        pass as wide as its longest row, where padding is on the right, the pass runs on the
        CPU and the task batches by length; else windows of ``max_rows`` in order, as wide as
        the batch. A GPU's cost of one more pass (kernel launches) was not measured, and
        cutting a left-padded pass (GPT-2 may pad so) would move its rows' positions."""
        if self.passes_by_length and self.pads_right and self.task.batch_by_length:
            return [(rows, max(lengths[i] for i in rows)) for rows in forward_passes(lengths, self.max_rows)]
        return [(list(range(i, min(i + self.max_rows, len(lengths)))), width)
                for i in range(0, len(lengths), self.max_rows)]

    def _forward_passes(self, enc, passes: list[tuple[list[int], int]]) -> Any:
        """``_forward`` on each of ``passes`` (``_passes``), its scores in the batch's row order;
        a token classifier's padded past a pass's width with zeros (no token reads them)."""
        import torch
        import transformers

        rows = int(next(iter(enc.values())).shape[0])
        if len(passes) == 1 and len(passes[0][0]) == rows:
            return self._forward(enc)
        scores = None
        for pass_rows, width in passes:
            index = torch.tensor(pass_rows)
            part = self._forward(transformers.BatchEncoding({k: v[index, :width] for k, v in enc.items()}))
            if scores is None:  # (rows, labels), or a token classifier's (rows, tokens, labels)
                shape = (rows, *part.shape[1:]) if part.dim() == 2 else (rows, enc["attention_mask"].shape[-1], part.shape[-1])
                scores = part.new_zeros(shape)
            scores[index, :part.shape[1]] = part
        return scores

    def answer_lone_texts_with(self, lone: LoadedModel) -> None:
        """Run the forward pass of a batch of one short text (one row of at most
        ``LONE_MAX_TOKENS``) on ``lone`` (``choose_lone_runtime``), which this replica now
        holds too."""
        self.lone = lone
        self.weight_bytes += lone.weight_bytes

    def predict(self, texts: list[str]) -> tuple[list[dict[str, Any]], int, int]:
        """Answers in order, and the batch's real and padded token counts. An input the
        tokenizer refuses, or one the model scores as NaN/inf, raises InputRejected: the
        batcher then runs the batch in halves until that input stands alone."""
        probs, encoding, tokens, padded = self.scores(texts, self.task.serving_tokenizer_options(self.max_length))
        return self.task.answers(texts, probs.tolist(), self.head, encoding), tokens, padded


class OnnxModel(LoadedModel):
    """The same version run by ONNX Runtime from an artifact ``tuneloop optimize`` built
    (``model.onnx`` beside the version's tokenizer; int8 or fp32 weights), on the replica's
    torch threads. The head's labels come from the checkpoint's config, as for PyTorch."""

    def __init__(self, path: str, version: str, task: Task, max_length: int, artifact: str, runtime: str):
        self.artifact, self.runtime = artifact, runtime
        super().__init__(path, version, task, max_length)

    def _load_weights(self, path: str) -> None:
        import torch

        with open(os.path.join(path, "config.json")) as f:
            id2label = json.load(f)["id2label"]
        self.head = checkpoint_labels(id2label, self.task.head_labels(), self.version)
        self.session = onnx_session(os.path.join(path, self.artifact), torch.get_num_threads())
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.weight_bytes = os.path.getsize(os.path.join(path, self.artifact))

    def _forward(self, enc) -> Any:
        import torch

        feed = {k: v.numpy() for k, v in enc.items() if k in self.inputs}
        logits = torch.from_numpy(self.session.run(["logits"], feed)[0]).float()
        return logits.sigmoid() if self.task.activation == "sigmoid" else logits.softmax(-1)


def onnx_session(path: str, threads: int):
    """An ONNX Runtime session on the CPU with ``threads`` intra-op threads and all graph
    optimizations (ONNX Runtime fuses attention and GELU on load)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings name graph internals
    # int8 the same on every x86 CPU: ONNX Runtime's U8S8 matrix multiply saturates where the
    # CPU lacks VNNI (AVX2, AVX512 without VNNI), so an artifact that passed parity on the
    # VNNI machine that built it answered otherwise on such a node. This takes the exact U8U8
    # kernel there (slower, by about a seventh in others' measurements); VNNI CPUs, as this
    # project's, run as before.
    options.add_session_config_entry("session.x64quantprecision", "1")
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def load_model(path: str, version: str, task: Task, max_length: int, runtime: str = "torch",
               artifact: str | None = None, gpu: bool = False, max_rows: int | None = None) -> LoadedModel:
    """A version on ``runtime``; ``artifact`` is the ONNX file's path under ``path``; ``gpu``:
    PyTorch runtimes use a GPU (ONNX Runtime runs on the CPU); ``max_rows``: rows (windows) a
    forward pass takes at most (a replica's ``max_batch_size``)."""
    if runtime in ("torch", "torch-bf16"):
        loaded = LoadedModel(path, version, task, max_length, bf16=runtime == "torch-bf16", gpu=gpu)
    elif artifact is None:
        raise ValueError(f"runtime {runtime!r} needs the artifact's path")
    else:
        loaded = OnnxModel(path, version, task, max_length, artifact, runtime)
    if max_rows is not None:
        loaded.max_rows = max_rows
    return loaded

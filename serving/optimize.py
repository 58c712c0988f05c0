"""Build a version's optimized artifacts, check their parity, measure every runtime.

``tuneloop optimize <model> <version>`` runs it, and so does a job before its version takes
traffic. For each runtime of ``optimize.runtimes``:

- ``onnx``: the PyTorch model exported by torch's dynamo exporter (batch and sequence
  length dynamic), run by ONNX Runtime. The older TorchScript exporter traced
  transformers 5's attention-mask code at the sample's length: its logits differed by up
  to 0.06 and 15% of SST-2 answers changed (measured); the dynamo export matches to 1e-7.
- ``onnx-int8``: that export with its MatMul weights quantized to int8, a scale per
  output channel, and activations quantized per forward pass (ONNX Runtime's dynamic
  quantization), after SmoothQuant moved most of each activation channel's range into the
  weights (``smooth_quant.py``), calibrated on up to 256 of the version's training texts.
- ``torch-bf16``: the PyTorch weights cast to bf16 at load (no file), built only on a CPU
  with native bf16 arithmetic (AVX512-BF16 or AMX: ``cpu-bf16`` in the hardware class).
  On MiniLM-L6 fine-tuned on 6,000 SST-2 rows it answered all 872 SST-2 dev rows as fp32
  does, at 1.6x fp32's texts/s at batch 32 and 1.7x at batch 8, where int8 without
  smoothing agreed on 97.3% at 1.7x (measured on an EPYC with AVX512-BF16).
  ``torch.compile`` on top reached 1.84x but took 30 s per load: not used. Compiled once
  at publish instead (AOTInductor with frozen weights: 15 s to build on 2 cores, 0.05 s to
  load), MiniLM-L6's bf16 forward pass took 6.0-6.6 ms against eager's 8.1 for one short
  SST-2 text, one thread, and 144-154 against 143 texts/s at batch 32, which ``auto`` ranks
  by: not built, as its binary holds the build CPU's instruction set (a replica on another
  CPU would crash loading it) and needs a C++ compiler on every job's node.

Each artifact then answers the model's golden rows beside the PyTorch version
(``parity_check``: agreement and accuracy), and every runtime's texts/s through the whole
predict path (tokenizer, forward, answers) is measured on this process's hardware at the
replica's thread count, which ``serving.runtime: auto`` ranks them by. The manifest records
all of it; an artifact that fails parity is kept for inspection but never serves batches (an
ONNX one that passed answering one text at a time may answer lone texts: ``serves_alone``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from datetime import UTC, datetime

from tuneloop.core.config import TuneloopConfig
from tuneloop.core.runtimes import (ArtifactRecord, Optimization, ParityCheck, hardware_class, parity_check,
                                    serves_alone, worst_parity)
from tuneloop.core.tasks import Task, model_task
from tuneloop.serving.loaded_models import LONE_MAX_TOKENS, LoadedModel, cpu_class, load_model
from tuneloop.serving.smooth_quant import activation_ranges
from tuneloop.store.manifest import ARTIFACTS, Manifest
from tuneloop.store.registry import Registry

log = logging.getLogger("tuneloop.optimize")
SAMPLE_TEXTS = ["a short one", "and a somewhat longer sample text for the export"]


def forward_inputs(net, encoding: dict) -> dict:
    """The tensors of ``encoding`` that ``net.forward`` names. A tokenizer may return more
    than its model takes (a BERT tokenizer saved beside a DistilBERT gives
    ``token_type_ids``); eager PyTorch swallows them in ``**kwargs``, but the exporter's
    dynamic shapes must name the forward's arguments exactly."""
    import inspect

    named = {name for name, p in inspect.signature(net.forward).parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {name: value for name, value in encoding.items() if name in named}


def export_onnx(path: str, task: Task, out: str) -> None:
    """Export the version at ``path`` (fp32, on the CPU) to ``out``, with dynamic batch and length."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    net = getattr(transformers, task.auto_class).from_pretrained(path, dtype=torch.float32).eval()
    net.config.use_cache = False  # a decoder (GPT-2) returns its key-value cache too otherwise: not exportable
    enc = tokenizer(SAMPLE_TEXTS, padding=True, return_tensors="pt", **task.tokenizer_options)
    task.encoding_for(enc)  # drops what the model does not take (offsets, word ids)
    longest = int(getattr(net.config, "max_position_embeddings", 0) or 8192)
    batch, length = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("length", min=1, max=longest)
    inputs = forward_inputs(net, dict(enc))
    program = torch.onnx.export(net, (), kwargs=inputs, input_names=list(inputs), output_names=["logits"],
                                dynamic_shapes={name: {0: batch, 1: length} for name in inputs},
                                dynamo=True, optimize=True, verbose=False)
    program.save(out)


def quantize_int8(source: str, out: str, ranges: dict | None = None, alpha: float = 0.0) -> int:
    """int8 weights, one scale per output channel, smoothed first (``smooth_quant.py``) when
    ``alpha`` > 0 and calibration ``ranges`` are given. Measured on MiniLM-L6 fine-tuned on
    2,000 SST-2 rows (872 dev rows), before smoothing: one scale per tensor answered 95.5% of
    rows as fp32 did (accuracy -0.6 point), per channel 98.3% (+0.1 point) at the same speed
    (2.2x fp32); 7-bit ``reduce_range`` 91.4%, uint8 weights 97.1% at two thirds of the
    speed, and leaving the feed-forward layers in fp32 98.6% at 0.7x the speed. Keeping the
    most sensitive layers in fp32 (on a 6,000-row model at 98.0%): layer 0 98.97% at 0.75x
    the speed, layers 0 and 1 99.2% at half of it. Smoothing (alpha 0.8) took a 6,000-row
    model from 97.25% to 99.54% at full speed. On another 6,000-row model that missed the
    99% bar (98.51%), what the one activation scale per batch costs: the same artifact
    agreed on 99.08% answering one text at a time, 98.85% in batches of 8; no alpha from 0.5
    to 1.0 passed (98.5-98.97%); a scale per token (a MatMulInteger graph built by hand)
    reached 99.20% at 0.67x the speed, and ONNX Runtime's blocked 8-bit MatMulNBits (int8
    arithmetic) 99.3-99.9% at 0.6x, slower than bf16 where bf16 is native: neither is used.
    The serving benchmark's fine-tune, whose int8 answered 98.85% at batch 32 padded whole,
    answered 99.43% in passes by length (``forward_passes``: a scale per pass of texts of
    about one length)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from tuneloop.serving.smooth_quant import smooth

    smoothed_matmuls = 0
    if alpha > 0 and ranges:
        smoothed = f"{out}.smoothed.onnx"
        smoothed_matmuls = smooth(source, smoothed, ranges, alpha)
        source = smoothed
    try:
        quantize_dynamic(source, out, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        if source != out and source.endswith(".smoothed.onnx"):
            os.remove(source)
    return smoothed_matmuls


# The exporter's and its optimizer's chatter: a line per graph rewrite at info (70 an
# export), torchvision's absence, axis renames; and ONNX Runtime's quantizer, which advises
# shape-inference pre-processing on the root logger (dynamic int8 of MatMuls needs none).
NOISY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._export")
NOISY_MODULES = r"(copyreg|onnx_ir|onnxscript|onnxruntime|torch\.onnx|torch\.export|torch\._export|torch\.fx)(\..*)?"


class _FromTheQuantizer(logging.Filter):
    """Drops what ONNX Runtime's modules log on the root logger (``logging.warning``); a root
    logger's filter sees only records logged on it, never those of other loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "/onnxruntime/" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def _quiet():
    """The exporters and quantizer quiet, and only they: the root logger's level and every
    warning were turned off for the process while a build ran (minutes, in the job process,
    whose other threads' warnings went with them)."""
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    root, quantizer = logging.getLogger(), _FromTheQuantizer()
    try:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        root.addFilter(quantizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=NOISY_MODULES)
            yield
    finally:
        root.removeFilter(quantizer)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _golden_rows(registry: Registry, model: str, version: str, max_rows: int):
    """Up to ``max_rows`` of the golden set the version was judged on, spread over it: the
    rows its job published beside it (a configured golden_dataset, a student's teacher's
    set), or for a version published without them the model's frozen set; None without."""
    table = registry.table(model, version, "golden")
    if table is None:
        table = registry.golden(model)
    if table is None or table.num_rows == 0:
        return None
    # Spread over the set: a golden file sorted by label, cut at its first rows, checked one class.
    rows = min(table.num_rows, max_rows)
    return table.take([i * table.num_rows // rows for i in range(rows)])


def _golden(registry: Registry, model: str, version: str, task: Task,
            max_rows: int) -> tuple[list[str], dict[str, list]]:
    """The texts and training targets of the version's golden rows (``_golden_rows``)."""
    table = _golden_rows(registry, model, version, max_rows)
    if table is None:
        return [], {}
    targets = task.training_targets({c: table.column(c).to_pylist() for c in task.target_columns})
    return table.column("text").to_pylist(), targets


def speed_texts(registry: Registry, model: str, version: str, batch_size: int, max_rows: int) -> list[str]:
    """The texts every runtime's speed is measured on: the version's golden texts (the
    model's own lengths), else ``SAMPLE_TEXTS``, a batch of them."""
    table = _golden_rows(registry, model, version, max_rows)
    return _timed_on(table.column("text").to_pylist() if table is not None else [], batch_size)


def _timed_on(golden_texts: list[str], batch_size: int) -> list[str]:
    """The golden texts, else a batch of ``SAMPLE_TEXTS``: what every runtime is timed on,
    by the job and by a replica (``speed_texts``) alike."""
    return golden_texts or SAMPLE_TEXTS * batch_size


def measure_runtimes(load: Callable[[str], LoadedModel], runtimes: list[str], texts: list[str], batch_size: int,
                     seconds: float) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """(texts/s of each of ``runtimes`` that ``load`` loaded and ran, each one's milliseconds
    for one text alone, why each other one did not run), one after another: a replica
    ranking the runtimes on its own hardware class."""
    speeds, lone, failed = {}, {}, {}
    for runtime in runtimes:
        try:
            loaded = load(runtime)
            speeds[runtime] = texts_per_s(loaded, texts, batch_size, seconds)
            lone[runtime] = lone_text_ms(loaded, texts, seconds / 2)
        except Exception as e:  # noqa: BLE001 - an artifact that does not run here is not ranked
            speeds.pop(runtime, None)
            failed[runtime] = f"{type(e).__name__}: {e}"
    return speeds, lone, failed


def _answers(loaded: LoadedModel, task: Task, texts: list[str], targets: dict[str, list],
             batch_size: int) -> tuple[list, float]:
    """Per golden row, the model's answer in the task's evaluation form, and its accuracy."""
    y_true, y_pred = [], []
    # Scores come in the checkpoint's label order; the task reads them in the config's (a
    # version trained before the config listed its labels in another order is still served).
    order = [loaded.head.index(label) for label in task.head_labels()]
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        probs, encoding, _, _ = loaded.scores(chunk, task.serving_tokenizer_options(loaded.max_length))
        probs = probs[..., order]
        truth, answers = task.evaluated({c: v[i:i + batch_size] for c, v in targets.items()}, encoding, probs.tolist())
        y_pred.extend(answers)
        y_true.extend(truth)
    return y_pred, float(task.metrics(y_true, y_pred).accuracy) if y_true else math.nan


def _short_rows(loaded: LoadedModel, texts: list[str]) -> list[int]:
    """The golden rows a lone-text runtime answers: one row of at most ``LONE_MAX_TOKENS``,
    once cut at the model's ``max_length`` (at 32 or below, every text: each is cut that
    short), or, for a task that reads a long text in windows of ``max_length`` (NER), one
    that fits in one window."""
    windows = bool(loaded.task.serving_tokenizer_options(loaded.max_length).get("return_overflowing_tokens"))
    cut_at = LONE_MAX_TOKENS + 1 if windows else min(LONE_MAX_TOKENS + 1, loaded.max_length)
    most = min(LONE_MAX_TOKENS, loaded.max_length) if windows else LONE_MAX_TOKENS
    cut = loaded.tokenizer(texts, truncation=True, max_length=cut_at)["input_ids"] if texts else []
    return [i for i, ids in enumerate(cut) if len(ids) <= most]


def _calibration_texts(registry: Registry, model: str, version: str, golden_texts: list[str],
                       rows: int) -> tuple[list[str], str]:
    """(texts that calibrate int8's smoothing, where they come from): up to ``rows`` of the
    version's training rows, spread over them, else of its golden texts (a version published
    without its training rows), which the parity check then also reads."""
    table = registry.table(model, version, "trained_on")
    texts = table.column("text").to_pylist() if table is not None and table.num_rows else []
    source = "trained_on"
    if not texts:
        texts, source = golden_texts, "golden"
    step = max(1, len(texts) // rows)
    return texts[::step][:rows], source


def texts_per_s(loaded: LoadedModel, texts: list[str], batch_size: int, seconds: float) -> float:
    """Texts/s through ``predict`` (tokenizer, forward, answers) at ``batch_size``, over at
    least ``seconds`` after one warm-up batch, cycling through ``texts``."""
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)] or [SAMPLE_TEXTS]
    loaded.predict(batches[0])
    done, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds or done == 0:
        done += len(loaded.predict(batches[i % len(batches)])[0])
        i += 1
    return done / (time.perf_counter() - start)


def lone_text_ms(loaded: LoadedModel, texts: list[str], seconds: float) -> float:
    """Median milliseconds of ``predict`` of one text alone (tokenizer, forward, answer),
    over at least ``seconds`` after a few warm-up texts, cycling through those of ``texts``
    a lone-text runtime answers (``_short_rows``; ``SAMPLE_TEXTS`` if none is): what a lone
    request waits for its answer, which ``choose_lone_runtime`` ranks by. Timed on every
    text, a golden set of long texts ranked the runtimes as they do at 191 tokens (int8 46
    ms, bf16 38), not as at the short texts they would answer (int8 3.9, bf16 10.8 at 11)."""
    texts = [texts[i] for i in _short_rows(loaded, texts)] or SAMPLE_TEXTS
    for text in texts[:3]:
        loaded.predict([text])
    times, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < seconds or len(times) < 5:
        began = time.perf_counter()
        loaded.predict([texts[i % len(texts)]])
        times.append(time.perf_counter() - began)
        i += 1
    return statistics.median(times) * 1e3


def _no_bf16(device: str, hardware: str) -> str | None:
    """Why ``torch-bf16`` is not built here, or None where it is."""
    if device == "cuda":
        return "on a GPU PyTorch already serves in bf16"
    if hardware.startswith("cpu/"):
        return "this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX): emulated, it runs slower than fp32"
    return None


def _int8(fp32: str, out: str, alpha: float, calibration: tuple[list[str], str],
          ranges_of: Callable[[list[str]], dict]) -> dict:
    """Quantize ``fp32`` to ``out``, smoothed at ``alpha`` on the ``calibration`` texts
    (none: unsmoothed); returns the settings the manifest records."""
    texts, source = calibration
    alpha = alpha if texts else 0.0
    settings = {"weights": "int8, a scale per output channel", "activations": "uint8, a scale per batch",
                "smoothing_alpha": alpha}
    ranges = None
    if alpha > 0:
        settings.update(calibration=source, calibration_rows=len(texts))
        ranges = ranges_of(texts)
    # What the smoothing reached: none where no MatMul's weight is its own initializer (a
    # model whose layers share weights), which the record said was smoothed at alpha.
    settings["smoothed_matmuls"] = quantize_int8(fp32, out, ranges, alpha)
    if not settings["smoothed_matmuls"]:
        settings["smoothing_alpha"] = 0.0
    return settings


def _not_built(runtime: str, build_s: float, why: str, path: str = "") -> ArtifactRecord:
    """The record of an artifact that was not built: failed, so never served, saying why."""
    return ArtifactRecord(runtime=runtime, path=path, bytes=0, build_s=round(build_s, 2),
                          parity=ParityCheck(passed=False, rows=0, agreement=0.0, accuracy=None,
                                             reference_accuracy=None, detail=f"not built: {why}"))


def optimize_version(cfg: TuneloopConfig, registry: Registry, model: str, version: str,
                     progress: Callable[[str], None] = log.info) -> Manifest:
    """Build, check and measure ``version``'s artifacts; record them in its manifest."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a weights-loading bar per runtime
    ocfg, task = cfg.optimize, model_task(cfg.model(model))
    path = registry.local_path(model, version)
    threads = cfg.serving.replica_threads
    torch.set_num_threads(threads)  # the replica's: speeds are ranked for it
    texts, targets = _golden(registry, model, version, task, ocfg.parity_max_rows)
    max_length = cfg.serving.max_length
    gpu = cfg.serving.num_gpus_per_replica > 0  # measured where the replicas run
    reference = LoadedModel(path, version, task, max_length, gpu=gpu)
    reference.max_rows = cfg.serving.max_batch_size  # as a replica runs it
    reference_answers, reference_accuracy = _answers(reference, task, texts, targets, ocfg.speed_batch_size)
    # The rows a lone-text runtime would answer (one short row each), and PyTorch's answers there.
    short = _short_rows(reference, texts)
    short_texts, short_targets = [texts[i] for i in short], {c: [v[i] for i in short] for c, v in targets.items()}
    short_reference = _answers(reference, task, short_texts, short_targets, ocfg.speed_batch_size)
    tokenizer, max_length = reference.tokenizer, reference.max_length  # held to what the model takes
    device = "cuda" if reference.device.type == "cuda" else "cpu"
    hardware = hardware_class("cuda" if device == "cuda" else cpu_class(), threads)
    timed = _timed_on(texts, ocfg.speed_batch_size)
    speeds = {"torch": texts_per_s(reference, timed, ocfg.speed_batch_size, ocfg.speed_seconds)}
    # One text alone is timed on CPUs only: a GPU's replicas have one runtime (choose_lone_runtime).
    lone = {"torch": lone_text_ms(reference, timed, ocfg.speed_seconds / 2)} if device == "cpu" else {}
    progress(f"{model} {version}: torch {speeds['torch']:.0f} texts/s on {hardware}"
             + (f", one text {lone['torch']:.1f} ms" if lone else ""))
    del reference
    records: dict[str, ArtifactRecord] = {}
    # Each build in a folder of its own under artifacts/: a rebuild never writes over the
    # files a replica may be loading under the last build's parity record.
    build = f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="tuneloop-optimize-") as tmp:
        fp32 = os.path.join(tmp, build, "onnx", "model.onnx")
        for runtime in dict.fromkeys(ocfg.runtimes):  # in order, once each
            started = time.perf_counter()
            out, relative = None, ""  # torch-bf16: no file, the version's weights cast at load
            settings: dict = {}
            if runtime == "torch-bf16" and (why := _no_bf16(device, hardware)):
                records[runtime] = _not_built(runtime, 0.0, why)
                progress(f"{model} {version}: torch-bf16 not built: {why}")
                continue
            progress(f"{model} {version}: building {runtime}")
            if runtime != "torch-bf16":
                out = fp32 if runtime == "onnx" else os.path.join(tmp, build, runtime, "model.onnx")
                os.makedirs(os.path.dirname(out), exist_ok=True)
                relative = f"{ARTIFACTS}/{os.path.relpath(out, tmp)}"
                try:
                    with _quiet():
                        if not os.path.exists(fp32):
                            export_onnx(path, task, fp32)
                        if runtime == "onnx-int8":
                            calibration = _calibration_texts(registry, model, version, texts, ocfg.calibration_rows)
                            settings = _int8(fp32, out, ocfg.int8_smoothing, calibration,
                                             lambda sample: activation_ranges(fp32, tokenizer, task, sample,
                                                                             max_length, threads))
                except Exception as e:  # noqa: BLE001 - an architecture the exporter cannot take: torch serves
                    log.warning("%s %s: building %s failed: %s", model, version, runtime, e)
                    records[runtime] = _not_built(runtime, time.perf_counter() - started, f"{type(e).__name__}: {e}",
                                                  relative)
                    continue
            build_s = time.perf_counter() - started
            # At serving the artifact lies under the version's folder; here an absolute path
            # (os.path.join keeps it) points at the copy still in tmp.
            try:
                loaded = load_model(path, version, task, max_length, runtime, out, gpu=gpu,
                                    max_rows=cfg.serving.max_batch_size)  # as a replica runs it
                # An exported graph is also checked one text at a time, as a lone request runs it.
                # And at the replicas' largest batch where it is larger: dynamic int8's scale
                # covers a whole pass, and a larger pass holds more outliers.
                sizes = dict.fromkeys([ocfg.speed_batch_size] + ([1] if out else [])
                                      + ([cfg.serving.max_batch_size]
                                         if cfg.serving.max_batch_size > ocfg.speed_batch_size else []))
                checks = {}
                for size in sizes:
                    answers, accuracy = _answers(loaded, task, texts, targets, size)
                    checks[size] = parity_check(reference_answers, answers, accuracy, reference_accuracy,
                                                ocfg.min_agreement, ocfg.max_accuracy_drop, task.answered_right)
                lone_parity = None
                if out:  # as a lone-text runtime: the short rows, one at a time
                    answers, accuracy = _answers(loaded, task, short_texts, short_targets, 1)
                    lone_parity = parity_check(short_reference[0], answers, accuracy, short_reference[1],
                                               ocfg.min_agreement, ocfg.max_accuracy_drop, task.answered_right)
            except Exception as e:  # noqa: BLE001 - built, but it will not load or answer: torch serves
                log.warning("%s %s: %s was built but does not run: %s", model, version, runtime, e)
                records[runtime] = _not_built(runtime, build_s, f"{type(e).__name__}: {e}", relative)
                continue
            parity = worst_parity(checks)
            size = os.path.getsize(out) if out else loaded.weight_bytes  # torch-bf16: its weights as loaded
            records[runtime] = ArtifactRecord(runtime=runtime, path=relative, bytes=size,
                                              build_s=round(build_s, 2), parity=parity,
                                              settings=settings, lone_parity=lone_parity)
            if device == "cpu":  # ONNX Runtime's CPU build: no speed for a GPU's class
                if parity.passed:
                    speeds[runtime] = texts_per_s(loaded, timed, ocfg.speed_batch_size, ocfg.speed_seconds)
                if serves_alone(records[runtime]):  # failed in batches, it may still answer lone texts
                    lone[runtime] = lone_text_ms(loaded, timed, ocfg.speed_seconds / 2)
            alone_only = not parity.passed and runtime in lone
            progress(f"{model} {version}: {runtime} built in {build_s:.0f}s, {size / 1e6:.0f} MB; "
                     f"parity {'passed' if parity.passed else 'FAILED'}: {parity.detail}"
                     + (f"; {speeds[runtime]:.0f} texts/s" if runtime in speeds else "")
                     + (f"; one text alone {lone[runtime]:.1f} ms" if runtime in lone else "")
                     + (f"; may answer lone texts: {lone_parity.agreement:.2%} of the {lone_parity.rows} golden rows "
                        "of one short row, one at a time" if alone_only else ""))
        if "onnx" not in records and os.path.exists(fp32):
            os.remove(fp32)  # only int8 was asked for: its fp32 source is not kept
        optimization = Optimization(artifacts=records, texts_per_s={hardware: {k: round(v, 1) for k, v in speeds.items()}},
                                    lone_ms={hardware: {k: round(v, 2) for k, v in lone.items()}} if lone else {},
                                    batch_size=ocfg.speed_batch_size, built_at=datetime.now(UTC).isoformat())
        return registry.record_optimization(model, version, tmp, optimization)

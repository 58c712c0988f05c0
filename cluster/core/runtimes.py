"""What runs a version's forward passes: PyTorch, or an optimized artifact built from it.

Every version can carry optimized artifacts (``ArtifactRecord``): an ONNX export run by ONNX
Runtime, its dynamically quantized int8 variant, and the PyTorch weights cast to bf16 on a CPU
with native bf16 (``torch-bf16``: no file of its own, cast at load). Each passed or failed a parity check
against the PyTorch version on the golden set (``parity_check``), and the texts/s of every
runtime was measured where it was built, on one hardware class (``hardware_class``). A
replica serves with ``choose_runtime``: the one its config names, or under ``auto`` the
fastest that passed on its own hardware class, which a replica on a class no one measured
measures first (``unmeasured_runtimes``), and beside it, for a batch of one text, the runtime
quickest at one text where that is another (``choose_lone_runtime``). Pure: the manifest's
records in, names out.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field

TORCH = "torch"
LONE_GAIN = 0.9  # a lone-text runtime must take at most this share of the batch runtime's time
RuntimeName = Literal["auto", "torch", "onnx", "onnx-int8", "torch-bf16"]
ArtifactName = Literal["onnx", "onnx-int8", "torch-bf16"]  # built on CPU; on a GPU torch serves in bf16


class ParityCheck(BaseModel):
    """An artifact's answers against the PyTorch version's, on the same golden rows."""

    passed: bool
    detail: str
    rows: int
    agreement: float  # share of rows answered the same
    accuracy: float | None  # the artifact's; None without golden labels
    reference_accuracy: float | None  # the PyTorch version's


class ArtifactRecord(BaseModel):
    runtime: ArtifactName
    path: str  # under the version's folder; "" for torch-bf16, which loads the version's weights
    bytes: int
    build_s: float
    parity: ParityCheck
    settings: dict[str, float | int | str] = Field(default_factory=dict)  # how it was built (int8: smoothing)
    # The same check answering one text at a time (ONNX artifacts): what the artifact is
    # judged by as a lone-text runtime (``choose_lone_runtime``), which runs nothing else.
    lone_parity: ParityCheck | None = None


class Optimization(BaseModel):
    """A version's artifacts and every runtime's measured speed, as its manifest keeps them."""

    artifacts: dict[str, ArtifactRecord] = Field(default_factory=dict)
    # hardware class -> runtime -> texts/s at ``batch_size``, measured one after another
    texts_per_s: dict[str, dict[str, float]] = Field(default_factory=dict)
    # hardware class -> runtime -> median milliseconds of one text alone (``choose_lone_runtime``)
    lone_ms: dict[str, dict[str, float]] = Field(default_factory=dict)
    batch_size: int = 32
    built_at: str | None = None

    def measured_on(self, hardware: str, texts_per_s: dict[str, float],
                    lone_ms: dict[str, float] | None = None) -> Optimization:
        """A copy with the speeds (and times for one text alone) measured on ``hardware``
        added to that class's, the others' kept."""
        def merged(by_class: dict[str, dict[str, float]], ours: dict[str, float]) -> dict[str, dict[str, float]]:
            return {**by_class, hardware: {**by_class.get(hardware, {}), **ours}}

        update = {"texts_per_s": merged(self.texts_per_s, texts_per_s)}
        if lone_ms:
            update["lone_ms"] = merged(self.lone_ms, lone_ms)
        return self.model_copy(update=update)

    def artifact_path(self, runtime: str) -> str | None:
        """What ``runtime`` loads under the version's folder: None for PyTorch, which loads the
        version's weights ("" for torch-bf16, which does too)."""
        return None if runtime == "torch" else self.artifacts[runtime].path


def native_bf16(machine: str, avx512_bf16: bool, amx_tile: bool, onednn_bf16: bool) -> bool:
    """Whether a CPU computes bf16 natively: on x86, AVX512-BF16 or AMX; elsewhere (Arm),
    oneDNN's own check. On x86 oneDNN's check says yes on any AVX-512 CPU (Skylake to Ice
    Lake), where it emulates bf16 at a fraction of fp32's speed: such a replica took the
    ``cpu-bf16`` class, and served bf16 on the speeds a native-bf16 node had measured."""
    if machine.lower() in ("x86_64", "amd64", "x86", "i386", "i686"):
        return avx512_bf16 or amx_tile
    return onednn_bf16


def hardware_class(device: str, threads: int) -> str:
    """The speed measurements' key: a device (``cpu``, ``cpu-bf16`` for a CPU with native
    bf16 arithmetic, or a GPU's name) and the threads a replica gives it; a replica of other
    threads, or a CPU without bf16 instructions, may rank the runtimes otherwise."""
    return f"{device}/{threads}t" if device.startswith("cpu") else device


def parity_check(reference: list, answers: list, accuracy: float, reference_accuracy: float,
                 min_agreement: float, max_accuracy_drop: float,
                 same: Callable[[Any, Any], bool] = operator.eq) -> ParityCheck:
    """Compare an artifact's answers on the golden rows (``answers``) with the PyTorch
    version's (``reference``), row by row (``same``: the task's ``answered_right``, so two
    tag sequences spelling the same entities agree), and their accuracies on those rows (the
    task's own). Passes when the share of rows answered the same reaches
    ``min_agreement`` and the artifact's accuracy is at most ``max_accuracy_drop`` below
    PyTorch's (both shares, 0..1)."""
    if len(reference) != len(answers):
        raise ValueError(f"parity rows differ: {len(reference)} reference answers, {len(answers)} artifact answers")
    n = len(answers)
    if n == 0:
        return ParityCheck(passed=False, rows=0, agreement=0.0, accuracy=None, reference_accuracy=None,
                           detail="no golden rows to check parity on: the artifact is not served")
    agreement = sum(same(r, a) for a, r in zip(answers, reference, strict=True)) / n
    numbers = {"rows": n, "agreement": agreement, "accuracy": accuracy, "reference_accuracy": reference_accuracy}
    problems = _parity_problems(agreement, n, accuracy, reference_accuracy, min_agreement, max_accuracy_drop)
    if problems:
        return ParityCheck(passed=False, detail="; ".join(problems), **numbers)
    return ParityCheck(passed=True, **numbers,
                       detail=f"answers {agreement:.2%} of {n} golden rows as PyTorch does; "
                              f"accuracy {accuracy:.4f} vs {reference_accuracy:.4f}")


def worst_parity(by_batch: dict[int, ParityCheck]) -> ParityCheck:
    """Of one artifact's parity checks at several batch sizes, the one it is judged by: a
    failed one, else the lowest agreement, its detail naming the batch size. Dynamic int8
    scales a MatMul's input by the batch's largest value, padding rows included, so a text's
    answer depends on its batch mates: one artifact agreed on 99.08% of the golden rows one
    at a time and 98.85% in batches of 8, and replicas answer at every size from 1 up."""
    size, worst = min(by_batch.items(), key=lambda kv: (kv[1].passed, kv[1].agreement, -kv[0]))
    if len(by_batch) == 1:
        return worst
    others = ", ".join(f"{check.agreement:.2%} at batch {n}" for n, check in sorted(by_batch.items()) if n != size)
    return worst.model_copy(update={"detail": f"at batch {size}: {worst.detail} ({others})"})


def _parity_problems(agreement: float, rows: int, accuracy: float | None, reference_accuracy: float | None,
                     min_agreement: float, max_accuracy_drop: float) -> list[str]:
    """What in an artifact's parity numbers misses the two bounds (none: it passes)."""
    problems = []
    if agreement < min_agreement:
        problems.append(f"answers {agreement:.2%} of {rows} golden rows as PyTorch does (needs {min_agreement:.2%})")
    if accuracy is not None and reference_accuracy is not None and accuracy < reference_accuracy - max_accuracy_drop:
        problems.append(f"accuracy {accuracy:.4f} is more than {max_accuracy_drop:g} below PyTorch's "
                        f"{reference_accuracy:.4f}")
    return problems


def holds_to(parity: ParityCheck, limits: tuple[float, float] | None) -> ParityCheck:
    """``parity`` judged again by today's ``(min_agreement, max_accuracy_drop)``: a record
    built under looser ones that today's refuse no longer passes (its numbers are kept)."""
    if limits is None or not parity.passed:
        return parity
    problems = _parity_problems(parity.agreement, parity.rows, parity.accuracy, parity.reference_accuracy, *limits)
    if not problems:
        return parity
    return parity.model_copy(update={"passed": False, "detail": "by today's optimize.min_agreement and "
                                                                "max_accuracy_drop: " + "; ".join(problems)})


def choose_runtime(requested: str, optimization: Optimization | None, hardware: str,
                   allowed: tuple[str, ...] | None = None,
                   parity_limits: tuple[float, float] | None = None) -> tuple[str, str]:
    """(runtime to serve with, why). A named artifact serves when it passed its parity check
    (``torch-bf16`` only on a CPU with native bf16), else PyTorch does (a version is never
    left unserved for want of an artifact). ``auto`` takes the fastest runtime measured on
    ``hardware`` among PyTorch and the artifacts that passed; with no measurement on this
    hardware class, PyTorch. Only artifacts ``allowed`` (``optimize.runtimes``; None: all)
    serve: an operator who drops one from the config stops it serving too. With
    ``parity_limits`` (the config's ``min_agreement, max_accuracy_drop``), a parity record
    must also hold to them: thresholds tightened since stop artifacts built before."""
    if requested == TORCH:
        return TORCH, "serving.runtime is torch"
    artifacts = _judged(optimization, allowed, parity_limits)
    if requested != "auto":
        if not hardware.startswith("cpu"):  # ONNX Runtime runs the artifacts on the CPU here
            return TORCH, f"serving.runtime is {requested}, an artifact built for CPUs: on {hardware} PyTorch serves"
        if requested == "torch-bf16" and hardware.startswith("cpu/"):
            return TORCH, "serving.runtime is torch-bf16, but this CPU has no native bf16 (emulated, slower than fp32)"
        record = artifacts.get(requested)
        if record is None:
            return TORCH, (f"serving.runtime is {requested}, but this version has no {requested} artifact (a job "
                           "builds them for a version its gate passed, unless optimize.enabled is false, or its "
                           "optimizing failed: `tuneloop optimize <model> <version>` builds it)")
        if not record.parity.passed:
            return TORCH, f"serving.runtime is {requested}, but its artifact failed parity: {record.parity.detail}"
        return requested, f"serving.runtime is {requested}; parity: {record.parity.detail}"
    speeds = (optimization.texts_per_s.get(hardware) if optimization else None) or {}
    eligible = {name: speed for name, speed in speeds.items()
                if name == TORCH or (name in artifacts and artifacts[name].parity.passed)}
    if not eligible:
        return TORCH, f"auto: no runtime measured on {hardware}"
    best = max(eligible, key=lambda name: (eligible[name], name == TORCH))
    ranked = ", ".join(f"{name} {speed:.0f}" for name, speed in sorted(eligible.items(), key=lambda kv: -kv[1]))
    return best, f"auto: fastest on {hardware} of those that passed parity (texts/s: {ranked})"


def choose_lone_runtime(requested: str, optimization: Optimization | None, hardware: str, chosen: str,
                        allowed: tuple[str, ...] | None = None,
                        parity_limits: tuple[float, float] | None = None) -> tuple[str | None, str]:
    """(the runtime that answers a batch of one text instead of ``chosen``, or None; why).

    ``auto`` ranks runtimes by texts/s at a full batch, where bf16's arithmetic wins; one
    text alone is a different race, lost to the cost of each operator's dispatch, where ONNX
    Runtime is lighter than eager PyTorch. MiniLM-L6, one thread, one short SST-2 text: bf16
    9.6-11.2 ms, fp32 ONNX 8.4-8.6, int8 6.1-6.7; at batch 2 bf16 is already as fast as
    ONNX (14.7-17.0 ms against 15.9-18.0) and at 8 it takes 0.6x ONNX's time. So under
    ``auto`` a replica keeps a second runtime for lone texts: among PyTorch and the ONNX
    artifacts that passed parity, in batches or answering one text at a time (``serves_alone``),
    the one with the lowest ``lone_ms`` on ``hardware``, when it takes at most ``LONE_GAIN``
    of ``chosen``'s time (holding it costs its weights' memory again). It answers a lone text of a few dozen tokens only (``LONE_MAX_TOKENS`` in
    ``serving/loaded_models.py``): past that bf16 wins again."""
    if requested != "auto" or not hardware.startswith("cpu") or optimization is None:
        return None, ""
    lone = optimization.lone_ms.get(hardware) or {}
    artifacts = _judged(optimization, allowed, parity_limits)
    # torch-bf16's parity is checked in batches only (the ONNX artifacts' at one text too);
    # it is never the quicker one at one text anyway (eager PyTorch's dispatch, above).
    candidates = {name: ms for name, ms in lone.items() if name == TORCH or (
        name != "torch-bf16" and name in artifacts and serves_alone(artifacts[name], parity_limits))}
    if chosen not in lone or not candidates:
        return None, ""
    best = min(candidates, key=lambda name: (candidates[name], name != chosen))
    if best == chosen or candidates[best] > LONE_GAIN * lone[chosen]:
        return None, ""
    return best, f"one text alone on {best} ({candidates[best]:.1f} ms against {lone[chosen]:.1f})"


def serves_alone(record: ArtifactRecord, parity_limits: tuple[float, float] | None = None) -> bool:
    """Whether an artifact may answer lone texts: it passed parity (``record.parity``, judged
    already), or passed it answering one text at a time, which is all a lone-text runtime
    does. Dynamic int8 scales each MatMul's input by its batch's largest value, padding
    included, so one artifact agreed with PyTorch on 99.31% of SST-2 dev one text at a time
    and 98.85% in batches of 32: refused for batches, fit for lone texts."""
    lone = record.lone_parity
    return record.parity.passed or (lone is not None and lone.rows >= lone_rows_needed(parity_limits)
                                    and holds_to(lone, parity_limits).passed)


def lone_rows_needed(parity_limits: tuple[float, float] | None) -> int:
    """The short golden rows a lone-text parity check needs to count: enough for one row
    answered otherwise to show against ``min_agreement`` (100 at 99%; at most 100). Judged on
    5 short rows of a golden set of long texts, an int8 artifact that failed every other
    check answered every lone short request on the strength of 5 of 5."""
    min_agreement = parity_limits[0] if parity_limits else 0.99
    return min(100, round(1 / (1 - min_agreement))) if min_agreement < 1 else 100


def unmeasured_runtimes(requested: str, optimization: Optimization | None, hardware: str,
                        allowed: tuple[str, ...] | None = None,
                        parity_limits: tuple[float, float] | None = None) -> list[str]:
    """The runtimes a replica on ``hardware`` measures itself before ``auto`` chooses, or
    none: under ``auto``, on a CPU, the artifacts that passed parity and run on this CPU but
    have no speed on this class (the version's job ran on another node: a GPU worker, a CPU
    without native bf16, other threads; or an artifact did not run where a replica measured
    before), and PyTorch beside them to rank them against. Without it such a replica served
    PyTorch: MiniLM-L6 in fp32 ran at 0.54x its bf16 artifact's texts/s and 0.73x its
    int8's at batch 32, one thread, on this project's CPU."""
    if requested != "auto" or not hardware.startswith("cpu") or optimization is None:
        return []
    measured = optimization.texts_per_s.get(hardware, {})
    alone = optimization.lone_ms.get(hardware, {})  # an artifact fit for lone texts only needs its time alone
    missing = [name for name, record in _judged(optimization, allowed, parity_limits).items()
               if serves_alone(record, parity_limits) and name not in (measured if record.parity.passed else alone)
               and not (name == "torch-bf16" and hardware.startswith("cpu/"))]
    return [TORCH, *missing] if missing else []


def _judged(optimization: Optimization | None, allowed: tuple[str, ...] | None,
            parity_limits: tuple[float, float] | None) -> dict[str, ArtifactRecord]:
    """``optimization``'s artifacts that ``allowed`` names (None: all), each parity record
    judged again by ``parity_limits``."""
    artifacts = optimization.artifacts if optimization else {}
    return {name: record.model_copy(update={"parity": holds_to(record.parity, parity_limits)})
            for name, record in artifacts.items() if allowed is None or name in allowed}

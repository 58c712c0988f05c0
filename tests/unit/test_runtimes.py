"""Which runtime serves a version, and the artifacts' parity check: pure, no torch, no Ray."""

from __future__ import annotations

import pytest

from tuneloop.core.runtimes import (ArtifactRecord, Optimization, ParityCheck, choose_lone_runtime, choose_runtime,
                                    hardware_class, native_bf16, parity_check,
                                    unmeasured_runtimes, worst_parity)


def test_parity_passes_within_both_bounds_and_quotes_its_numbers():
    check = parity_check(["a"] * 99 + ["b"], ["a"] * 100, accuracy=0.90, reference_accuracy=0.903,
                         min_agreement=0.99, max_accuracy_drop=0.005)
    assert check.passed and check.rows == 100 and check.agreement == pytest.approx(0.99)
    assert "99.00% of 100 golden rows" in check.detail


def test_parity_fails_on_agreement_or_accuracy_and_says_which():
    low = parity_check(["a"] * 100, ["a"] * 97 + ["b"] * 3, 0.9, 0.9, 0.99, 0.005)
    assert not low.passed and "97.00%" in low.detail and "needs 99.00%" in low.detail
    worse = parity_check(["a"] * 100, ["a"] * 100, 0.89, 0.90, 0.99, 0.005)
    assert not worse.passed and "accuracy 0.8900 is more than 0.005 below PyTorch's 0.9000" in worse.detail
    # An artifact that is more accurate than PyTorch is not held back for it.
    assert parity_check(["a"] * 100, ["a"] * 100, 0.95, 0.90, 0.99, 0.005).passed


def test_parity_with_no_rows_fails_and_unpaired_rows_raise():
    assert not parity_check([], [], 0.0, 0.0, 0.99, 0.005).passed
    with pytest.raises(ValueError, match="parity rows differ"):
        parity_check(["a"], ["a", "b"], 1.0, 1.0, 0.99, 0.005)


def test_an_artifact_is_judged_by_its_worst_batch_size():
    """Dynamic int8's answers depend on a text's batch mates: passing at batch 32 alone let an
    artifact serve lone requests it answered under the bar."""
    at_32 = parity_check(["a"] * 100, ["a"] * 100, 0.9, 0.9, 0.99, 0.005)
    at_1 = parity_check(["a"] * 100, ["a"] * 98 + ["b"] * 2, 0.9, 0.9, 0.99, 0.005)
    judged = worst_parity({32: at_32, 1: at_1})
    assert not judged.passed and judged.agreement == 0.98
    assert judged.detail.startswith("at batch 1: answers 98.00% of 100") and judged.detail.endswith("(100.00% at batch 32)")
    both_pass = worst_parity({32: at_32, 1: parity_check(["a"] * 100, ["a"] * 99 + ["b"], 0.9, 0.9, 0.99, 0.005)})
    assert both_pass.passed and both_pass.agreement == 0.99 and both_pass.detail.startswith("at batch 1: ")
    assert worst_parity({32: at_32}) == at_32  # one size: as it was


def _optimization(speeds: dict[str, float], failed: tuple[str, ...] = ()) -> Optimization:
    def record(runtime):
        return ArtifactRecord(runtime=runtime, path=f"artifacts/{runtime}/model.onnx", bytes=1, build_s=0.1,
                              parity=ParityCheck(passed=runtime not in failed, detail="d", rows=1, agreement=1.0,
                                                 accuracy=1.0, reference_accuracy=1.0))
    return Optimization(artifacts={r: record(r) for r in ("onnx", "onnx-int8")}, texts_per_s={"cpu/2t": speeds})


def test_auto_takes_the_fastest_that_passed_on_this_hardware():
    opt = _optimization({"torch": 100, "onnx": 130, "onnx-int8": 260})
    assert choose_runtime("auto", opt, "cpu/2t")[0] == "onnx-int8"
    assert choose_runtime("auto", _optimization({"torch": 100, "onnx": 130, "onnx-int8": 260}, failed=("onnx-int8",)),
                          "cpu/2t")[0] == "onnx"
    # PyTorch wins where it is fastest, and a tie.
    assert choose_runtime("auto", _optimization({"torch": 300, "onnx": 130, "onnx-int8": 260}), "cpu/2t")[0] == "torch"
    assert choose_runtime("auto", _optimization({"torch": 130, "onnx": 130}), "cpu/2t")[0] == "torch"


def test_an_artifact_dropped_from_optimize_runtimes_no_longer_serves():
    opt = _optimization({"torch": 100, "onnx": 130, "onnx-int8": 260})
    assert choose_runtime("auto", opt, "cpu/2t", allowed=("onnx", "torch-bf16"))[0] == "onnx"
    assert choose_runtime("auto", opt, "cpu/2t", allowed=())[0] == "torch"


def test_parity_thresholds_tightened_since_the_build_stop_the_artifacts_that_miss_them():
    opt = _optimization({"torch": 100, "onnx": 130, "onnx-int8": 260})
    opt.artifacts["onnx-int8"].parity = ParityCheck(passed=True, detail="d", rows=200, agreement=0.99, accuracy=0.88,
                                                    reference_accuracy=0.89)
    assert choose_runtime("auto", opt, "cpu/2t", parity_limits=(0.99, 0.01))[0] == "onnx-int8"  # as built
    assert choose_runtime("auto", opt, "cpu/2t", parity_limits=(0.995, 0.01))[0] == "onnx"
    runtime, why = choose_runtime("onnx-int8", opt, "cpu/2t", parity_limits=(0.99, 0.005))
    assert runtime == "torch" and "max_accuracy_drop: accuracy 0.8800 is more than 0.005 below PyTorch's 0.8900" in why


def test_auto_without_a_measurement_here_or_any_artifact_serves_torch():
    opt = _optimization({"torch": 100, "onnx-int8": 260})
    runtime, why = choose_runtime("auto", opt, "cpu/4t")
    assert runtime == "torch" and "no runtime measured on cpu/4t" in why
    assert choose_runtime("auto", None, "cpu/2t")[0] == "torch"


def test_a_lone_text_goes_to_the_runtime_quickest_at_one_text_when_it_saves_a_tenth():
    opt = _optimization({"torch": 100, "onnx": 130, "onnx-int8": 260})
    opt.lone_ms["cpu/2t"] = {"torch": 9.0, "onnx": 7.0, "onnx-int8": 8.5}
    assert choose_runtime("auto", opt, "cpu/2t")[0] == "onnx-int8"
    assert choose_lone_runtime("auto", opt, "cpu/2t", "onnx-int8") == ("onnx", "one text alone on onnx (7.0 ms against 8.5)")
    opt.lone_ms["cpu/2t"]["onnx"] = 7.7  # 0.906 of int8's time: not worth a second copy of the weights
    assert choose_lone_runtime("auto", opt, "cpu/2t", "onnx-int8")[0] is None
    opt.lone_ms["cpu/2t"]["onnx"] = 7.0
    # bf16's parity was checked in batches only: compared with, never a lone runtime.
    parity = ParityCheck(passed=True, detail="ok", rows=10, agreement=1.0, accuracy=0.9, reference_accuracy=0.9)
    bf16 = opt.model_copy(deep=True)
    bf16.artifacts["torch-bf16"] = ArtifactRecord(runtime="torch-bf16", path="", bytes=1, build_s=0.0, parity=parity)
    bf16.lone_ms["cpu/2t"]["torch-bf16"] = 5.0
    assert choose_lone_runtime("auto", bf16, "cpu/2t", "onnx-int8")[0] == "onnx"
    assert choose_lone_runtime("auto", bf16, "cpu/2t", "torch-bf16")[0] is None  # 7.0 ms is not quicker than 5.0
    # Only what passed parity, is allowed and holds to today's limits; only under auto, on a CPU.
    assert choose_lone_runtime("auto", opt, "cpu/2t", "onnx-int8", allowed=("onnx-int8",))[0] is None
    failed = _optimization({"torch": 100, "onnx": 130, "onnx-int8": 260}, failed=("onnx",))
    failed.lone_ms = opt.lone_ms
    assert choose_lone_runtime("auto", failed, "cpu/2t", "onnx-int8")[0] is None
    opt.artifacts["onnx"].parity = opt.artifacts["onnx"].parity.model_copy(update={"agreement": 0.99})
    assert choose_lone_runtime("auto", opt, "cpu/2t", "onnx-int8", parity_limits=(0.99, 0.01))[0] == "onnx"
    assert choose_lone_runtime("auto", opt, "cpu/2t", "onnx-int8", parity_limits=(0.995, 0.01))[0] is None
    assert choose_lone_runtime("onnx-int8", opt, "cpu/2t", "onnx-int8")[0] is None
    assert choose_lone_runtime("auto", opt, "cuda", "torch")[0] is None
    # An artifact that failed in batches but passed answering one text at a time (dynamic
    # int8, whose scales follow the batch) may answer lone texts, held to today's limits.
    alone = _optimization({"torch": 100, "onnx": 130, "onnx-int8": 260}, failed=("onnx-int8",))
    alone.lone_ms["cpu/2t"] = {"torch": 9.0, "onnx": 8.0, "onnx-int8": 6.0}
    assert choose_lone_runtime("auto", alone, "cpu/2t", "onnx")[0] is None  # int8's one-text parity unknown
    alone.artifacts["onnx-int8"].lone_parity = ParityCheck(passed=True, detail="d", rows=100, agreement=0.993,
                                                           accuracy=0.9, reference_accuracy=0.9)
    assert choose_runtime("auto", alone, "cpu/2t")[0] == "onnx"  # never in batches
    assert choose_lone_runtime("auto", alone, "cpu/2t", "onnx")[0] == "onnx-int8"
    assert choose_lone_runtime("auto", alone, "cpu/2t", "onnx", parity_limits=(0.995, 0.01))[0] is None
    # Judged on too few short rows to show one miss against 99%: 5 of 5 is no evidence.
    few = alone.artifacts["onnx-int8"].lone_parity
    alone.artifacts["onnx-int8"].lone_parity = few.model_copy(update={"rows": 5, "agreement": 1.0})
    assert choose_lone_runtime("auto", alone, "cpu/2t", "onnx")[0] is None
    assert choose_lone_runtime("auto", alone, "cpu/2t", "onnx", parity_limits=(0.8, 0.01))[0] == "onnx-int8"
    alone.artifacts["onnx-int8"].lone_parity = few
    # Its texts/s is never measured (it serves no batch): its time alone is all a class needs.
    del alone.texts_per_s["cpu/2t"]["onnx-int8"]
    assert unmeasured_runtimes("auto", alone, "cpu/2t") == []
    alone.texts_per_s["cpu/4t"], alone.lone_ms["cpu/4t"] = {"torch": 50, "onnx": 60}, {"torch": 9.0, "onnx": 8.0}
    assert unmeasured_runtimes("auto", alone, "cpu/4t") == ["torch", "onnx-int8"]
    # Nothing measured alone on this class (a build before lone texts were timed), or the
    # serving runtime not among what was: one runtime.
    assert choose_lone_runtime("auto", opt, "cpu/4t", "onnx-int8")[0] is None
    assert choose_lone_runtime("auto", opt, "cpu/2t", "torch-bf16")[0] is None
    assert choose_lone_runtime("auto", None, "cpu/2t", "torch")[0] is None


def test_a_replica_measures_what_passed_where_no_one_measured_its_class():
    opt = _optimization({"torch": 100, "onnx": 130, "onnx-int8": 260}, failed=("onnx-int8",))
    assert unmeasured_runtimes("auto", opt, "cpu/2t") == []  # measured on this class
    assert unmeasured_runtimes("auto", opt, "cpu/4t") == ["torch", "onnx"]  # failed parity: not worth a measurement
    assert unmeasured_runtimes("auto", opt, "cpu/4t", allowed=("onnx-int8",)) == []  # nothing but PyTorch could serve
    assert unmeasured_runtimes("auto", opt, "cpu/4t", parity_limits=(1.0, 0.0)) == ["torch", "onnx"]
    assert unmeasured_runtimes("onnx", opt, "cpu/4t") == []  # named: no ranking
    assert unmeasured_runtimes("auto", opt, "cuda") == []  # the artifacts are CPU runtimes
    assert unmeasured_runtimes("auto", None, "cpu/4t") == []
    # An artifact that passed but has no speed where the others have (it did not run where a
    # replica measured, or was allowed again since): it, and PyTorch to rank it against.
    partly = _optimization({"torch": 100, "onnx": 130})
    assert unmeasured_runtimes("auto", partly, "cpu/2t") == ["torch", "onnx-int8"]
    # bf16 is measured only on a CPU with native bf16, where it can serve.
    parity = ParityCheck(passed=True, detail="ok", rows=10, agreement=1.0, accuracy=0.9, reference_accuracy=0.9)
    opt.artifacts["torch-bf16"] = ArtifactRecord(runtime="torch-bf16", path="", bytes=1, build_s=0.0, parity=parity)
    assert unmeasured_runtimes("auto", opt, "cpu-bf16/1t") == ["torch", "onnx", "torch-bf16"]
    assert unmeasured_runtimes("auto", opt, "cpu/1t") == ["torch", "onnx"]
    # Measured, the replica's speeds decide as the job's would have.
    opt.texts_per_s["cpu-bf16/1t"] = {"torch": 50, "onnx": 60, "torch-bf16": 110}
    assert choose_runtime("auto", opt, "cpu-bf16/1t")[0] == "torch-bf16"


def test_a_named_runtime_serves_only_when_its_artifact_passed():
    opt = _optimization({"torch": 100}, failed=("onnx-int8",))
    assert choose_runtime("onnx", opt, "cpu/8t")[0] == "onnx"  # named: whatever the hardware
    runtime, why = choose_runtime("onnx-int8", opt, "cpu/2t")
    assert runtime == "torch" and "failed parity" in why
    runtime, why = choose_runtime("onnx", None, "cpu/2t")
    assert runtime == "torch" and "no onnx artifact" in why
    assert choose_runtime("torch", opt, "cpu/2t") == ("torch", "serving.runtime is torch")
    # A GPU replica would have run the CPU artifact beside an idle GPU.
    runtime, why = choose_runtime("onnx", opt, "cuda")
    assert runtime == "torch" and "built for CPUs: on cuda PyTorch serves" in why


def test_a_named_bf16_runtime_serves_only_on_a_cpu_with_native_bf16():
    parity = ParityCheck(passed=True, detail="ok", rows=10, agreement=1.0, accuracy=0.9, reference_accuracy=0.9)
    opt = Optimization(artifacts={"torch-bf16": ArtifactRecord(runtime="torch-bf16", path="", bytes=1, build_s=0.0,
                                                               parity=parity)})
    assert choose_runtime("torch-bf16", opt, "cpu-bf16/2t")[0] == "torch-bf16"
    runtime, why = choose_runtime("torch-bf16", opt, "cpu/2t")  # measured on another CPU: emulated here
    assert runtime == "torch" and "no native bf16" in why


def test_hardware_class_names_the_threads_on_cpu_only():
    assert hardware_class("cpu", 2) == "cpu/2t"
    assert hardware_class("cpu-bf16", 4) == "cpu-bf16/4t"  # a CPU with native bf16 ranks apart
    assert hardware_class("cuda", 2) == "cuda"


def test_native_bf16_on_x86_is_avx512_bf16_or_amx_not_onednns_word():
    """oneDNN says bf16 on any AVX-512 CPU (Skylake to Ice Lake), where it is emulated and
    slower than fp32: such replicas took the cpu-bf16 class and served bf16 on the speeds a
    native-bf16 node measured."""
    assert native_bf16("x86_64", avx512_bf16=False, amx_tile=False, onednn_bf16=True) is False  # Ice Lake
    assert native_bf16("x86_64", avx512_bf16=True, amx_tile=False, onednn_bf16=True) is True  # Zen 4
    assert native_bf16("AMD64", avx512_bf16=False, amx_tile=True, onednn_bf16=True) is True  # Sapphire Rapids
    assert native_bf16("aarch64", avx512_bf16=False, amx_tile=False, onednn_bf16=True) is True  # Arm: oneDNN's word
    assert native_bf16("aarch64", avx512_bf16=False, amx_tile=False, onednn_bf16=False) is False

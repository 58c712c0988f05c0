"""The model replica's decisions with fakes in place of the registry, the prediction log and
the model: milliseconds, no torch, no Ray (the same replica class Serve runs)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from tuneloop.core.batching_policy import next_batch_size
from tuneloop.core.config import parse_config
from tuneloop.core.errors import InputRejected, NonFiniteScores, NotReady, Overloaded
from tuneloop.core.rollout import LOAD_FAILURES_TO_ROLL_BACK
from tuneloop.core.runtimes import ArtifactRecord, Optimization, ParityCheck
from tuneloop.serving.loaded_models import LabelMismatch, cpu_class
from tuneloop.serving.model_server import ModelServer
from tuneloop.store.registry_state import RegistryState

LABELS = ["negative", "positive"]
CPU = cpu_class()  # cpu-bf16 on a CPU with native bf16: speeds are keyed by it


class FakeRegistry:
    def __init__(self, production: str | None, optimization: Optimization | None = None):
        self.production_version = production
        self.switched: list[str] = []
        self.optimization = optimization

    def manifest(self, model: str, version: str) -> SimpleNamespace:
        return SimpleNamespace(optimization=self.optimization)

    def production(self, model: str) -> str | None:
        return self.production_version

    def state(self, model: str) -> RegistryState:
        return RegistryState(production=self.production_version)

    def local_path(self, model: str, version: str) -> str:
        return f"/weights/{version}"

    def record_switch(self, model: str, version: str, replica: str) -> None:
        self.switched.append(version)

    def table(self, model: str, version: str, name: str) -> None:
        return None  # no golden rows published: the sample texts are timed

    def golden(self, model: str) -> None:
        return None

    def record_speeds(self, model: str, version: str, hardware: str, speeds: dict, built_at: str | None,
                      lone_ms: dict | None = None) -> None:
        self.recorded, self.recorded_lone = {hardware: speeds}, {hardware: lone_ms}
        self.optimization = self.optimization.measured_on(hardware, speeds, lone_ms)  # as the registry merges


class FakeRecorder:
    def __init__(self):
        self.rows: list[dict] = []

    def record(self, rows):
        self.rows.extend(rows)

    def close(self):
        pass


class FakeModel:
    """Scores every text 'positive'; ``delay_s`` per batch stands in for a forward pass."""

    def __init__(self, path, version, task, max_length, runtime="torch", artifact=None, delay_s=0.0):
        if version == "bad":
            raise LabelMismatch(f"version {version}'s checkpoint has labels ['x', 'y']")
        if runtime != "torch" and artifact.startswith("broken"):
            raise RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF")
        self.version, self.task, self.delay_s, self.max_length = version, task, delay_s, max_length
        self.runtime, self.artifact = runtime, artifact
        self.batches: list[int] = []
        self.weight_bytes = 1000
        self.lone = None
        self.warm_batch = None

    def answer_lone_texts_with(self, lone):
        self.lone = lone

    def tokenizer(self, texts, **options):  # a token a word
        return {"input_ids": [text.split()[:options.get("max_length")] for text in texts]}

    def predict(self, texts):
        time.sleep(self.delay_s)
        self.batches.append(len(texts))
        return [{"label": "positive", "score": 0.9, "scores": {"negative": 0.1, "positive": 0.9}} for _ in texts], 1, 1


def _replica(production="v1", delay_s=0.0, optimization=None, measure=True, **serving):
    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": LABELS}],
                        "serving": {"max_batch_size": 8, **serving}, "optimize": {"measure_on_replicas": measure}})
    registry, recorder = FakeRegistry(production, optimization), FakeRecorder()
    replica = ModelServer(cfg.model_dump(), "m", registry=registry, recorder=recorder, shadow_recorder=FakeRecorder(),
                          keys=object(),
                          load=lambda *a: FakeModel(*a, delay_s=delay_s), watch=False)
    replica._sync_with_registry()
    return replica, registry, recorder


def test_every_answer_carries_an_id_and_the_version_and_is_logged():
    replica, _, recorder = _replica()
    answers = asyncio.run(replica.predict(["a", "b"]))
    assert [a["version"] for a in answers] == ["v1", "v1"] and len({a["id"] for a in answers}) == 2
    assert [r["prediction_id"] for r in recorder.rows] == [a["id"] for a in answers]


def test_a_version_rolled_back_while_it_loaded_is_not_swapped_in():
    """Promote v2, roll back to v1 during v2's load (a download, runtimes timed): every
    replica swapped to v2 when its load ended, answered with it and recorded the switch."""
    replica, registry, _ = _replica()
    load = replica._versions.load_model

    def slow_load(path, version, *rest):
        loaded = load(path, version, *rest)
        registry.production_version = "v1"  # the rollback, while v2 loads
        return loaded

    replica._versions.load_model = slow_load
    registry.production_version = "v2"
    replica._sync_with_registry()
    assert replica.status()["version"] == "v1" and registry.switched == ["v1"]
    assert asyncio.run(replica.predict(["a"]))[0]["version"] == "v1"


def test_no_production_yet_is_not_ready():
    replica, _, _ = _replica(production=None)
    with pytest.raises(NotReady):
        asyncio.run(replica.predict(["a"]))


def test_a_refused_version_leaves_the_loaded_one_serving_and_is_not_retried():
    replica, registry, _ = _replica()
    loads: list[str] = []
    load = replica._versions.load_model
    replica._versions.load_model = lambda path, version, *rest: loads.append(version) or load(path, version, *rest)
    registry.production_version = "bad"
    counted = REGISTRY.get_sample_value("tuneloop_version_load_failures_total", {"model": "m", "version": "bad"}) or 0
    replica._sync_with_registry()
    replica._sync_with_registry()  # versions are immutable: not loaded again
    assert loads == ["bad"]
    # never loaded again, but counted at each look while named: counted once, its count could
    # fall before a rollout's stage began counting, and the rollback rule never saw it
    for _ in range(LOAD_FAILURES_TO_ROLL_BACK):
        replica._sync_with_registry()
    assert loads == ["bad"] and REGISTRY.get_sample_value(
        "tuneloop_version_load_failures_total", {"model": "m", "version": "bad"}) == counted + 2 + LOAD_FAILURES_TO_ROLL_BACK
    assert registry.switched == ["v1"]  # a refused version was never switched to
    assert replica.status() == {"model": "m", "version": "v1", "challenger": None, "rollout": None,
                                "refused": {"bad": "version bad's checkpoint has labels ['x', 'y']"}, "failed": {},
                                "resident_weight_bytes": {"v1": 1000},
                                "runtimes": {"v1": f"torch (auto: no runtime measured on {CPU}/1t)"}}
    assert asyncio.run(replica.predict(["a"]))[0]["version"] == "v1"


def test_a_version_refused_at_start_says_why_not_ready():
    replica, _, _ = _replica(production="bad")
    with pytest.raises(NotReady, match="checkpoint has labels"):
        asyncio.run(replica.predict(["a"]))


def test_past_capacity_the_answer_is_503_at_once():
    replica, _, _ = _replica(max_queued_requests=1)
    replica._in_flight = replica._max_in_flight
    start = time.perf_counter()
    with pytest.raises(Overloaded, match="at capacity"):
        asyncio.run(replica.predict(["a"]))
    assert time.perf_counter() - start < 0.5  # not after waiting in a queue (request_timeout_s)


def test_a_request_whose_work_would_wait_past_the_timeout_is_503_at_once():
    """The bound counts requests: 1,152 requests of 64 texts each were taken, waited
    request_timeout_s and timed out (counted against the version: a hung model's alert),
    where an immediate 503 was due."""
    replica, registry, _ = _replica(delay_s=0.08, request_timeout_s=1.0, max_batch_size=8)
    long = "word " * 40  # 200 characters: 52 units of work

    async def requests() -> float:
        assert len(replica._recent) == 1  # its warm-up batch, warm: a cost before any request
        await replica.predict([long] * 8)  # 0.08 s for 416 units, warm already: measured
        assert len(replica._recent) == 2
        replica._recent.clear()
        replica._recent.append((0.1, 1000))  # a unit costs 0.1 ms, exactly (sleeps overshoot)
        replica._units_in_flight = 9700  # held by other requests: about 0.97 s
        start = time.perf_counter()
        with pytest.raises(Overloaded, match=r"about 1s of work held; request_timeout_s 1\)"):
            await replica.predict([long] * 8)  # 416 more: past 1 s
        took = time.perf_counter() - start
        assert len(await replica.predict(["ok"] * 8)) == 8  # 8 short texts, 16 units: they fit
        replica._units_in_flight = 0
        assert len(await replica.predict([long] * 30)) == 30  # an idle replica takes any request
        return took

    assert asyncio.run(requests()) < 0.2
    registry.production_version = "v2"
    replica._sync_with_registry()
    assert list(replica._recent) == [replica._loaded.warm_batch]  # another version's cost: its own warm-up


def test_a_new_replica_prices_a_burst_by_its_warm_up_before_any_request_ran():
    """Before a version's first warm batch the replica had no cost a unit of work: a burst at
    a new replica was let in whole (19 of 60 requests of 64 long texts timed out)."""
    replica, _, _ = _replica(delay_s=0.05, request_timeout_s=1.0, max_batch_size=8)
    seconds, units = replica._loaded.warm_batch
    assert replica._loaded.batches == [8, 8] and units == 8 * 128  # a cold batch, then the timed one
    assert 0.05 <= seconds < 0.5 and list(replica._recent) == [(seconds, units)]
    long = "word " * 200  # 1,000 characters: cut at max_length, 128 units each

    async def burst():
        return await asyncio.gather(*(replica.predict([long] * 8) for _ in range(40)), return_exceptions=True)

    outcomes = asyncio.run(burst())
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    # 40 batches of 0.05 s are 2 s of work against a 1 s timeout: the rest refused at once,
    # none timed out (TimedOut is an Overloaded too, saying "did not answer").
    assert refused and not any("did not answer" in o.message for o in refused)
    assert sum(isinstance(o, list) for o in outcomes) >= 10


def test_a_version_whose_warm_up_fails_still_serves_and_its_first_batch_is_not_measured():
    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": LABELS}]})

    class Unwarmable(FakeModel):
        def predict(self, texts):
            if any(text.startswith("The service reads this sentence") for text in texts):
                raise RuntimeError("a tokenizer that cannot read it")
            return super().predict(texts)

    replica = ModelServer(cfg.model_dump(), "m", registry=FakeRegistry("v1"), recorder=FakeRecorder(),
                          shadow_recorder=FakeRecorder(), keys=object(), load=lambda *a: Unwarmable(*a), watch=False)
    replica._sync_with_registry()
    assert replica._loaded.warm_batch is None and not replica._recent
    assert asyncio.run(replica.predict(["a"]))[0]["version"] == "v1"
    assert not replica._recent  # its first batch ran cold: no measure
    asyncio.run(replica.predict(["b"]))
    assert len(replica._recent) == 1


def test_a_request_past_its_timeout_is_503():
    replica, _, _ = _replica(delay_s=0.3, request_timeout_s=0.05, target_batch_latency_s=0.02)
    with pytest.raises(Overloaded, match="did not answer within"):
        asyncio.run(replica.predict(["a"]))


def test_concurrent_requests_share_batches():
    replica, _, _ = _replica(delay_s=0.02)
    warm_up = len(replica._loaded.batches)  # its warm-up's batches, of 8: not this burst's

    async def burst():
        return await asyncio.gather(*(replica.predict([f"t{i}"]) for i in range(16)))

    assert len(asyncio.run(burst())) == 16
    batches = replica._loaded.batches[warm_up:]
    assert sum(batches) == 16 and len(batches) < 16


def test_a_batch_the_model_fails_on_shrinks_the_adaptive_limit():
    """A GPU out of memory at a full batch: its halves then succeeded under the limit
    ("partial, no signal") and the limit stayed, so every full batch failed again."""
    replica, _, _ = _replica(delay_s=0.02)
    real = replica._loaded.predict

    def out_of_memory_past_two(texts):
        if len(texts) > 2:
            raise RuntimeError("CUDA out of memory")
        return real(texts)

    replica._loaded.predict = out_of_memory_past_two

    async def burst():
        return await asyncio.gather(*(replica.predict([f"t{i}"]) for i in range(8)), return_exceptions=True)

    limit = replica._batcher.max_batch_size
    asyncio.run(burst())
    assert replica._batcher.max_batch_size < limit

    # One bad input fails a full batch and each half the batcher retries: one shrink, not one a half.
    replica._loaded.predict = real
    replica._batcher.max_batch_size = limit
    bad = replica._loaded.predict

    def fails_on_one_text(texts):
        if "bad" in texts:
            raise RuntimeError("a tokenizer bug on one input")
        return bad(texts)

    replica._loaded.predict = fails_on_one_text

    async def one_bad():
        return await asyncio.gather(*(replica.predict(["bad" if i == 3 else f"t{i}"]) for i in range(8)),
                                    return_exceptions=True)

    asyncio.run(one_bad())
    assert replica._batcher.max_batch_size == next_batch_size(replica._policy, limit, limit, float("inf"))


def _errors(version: str) -> float:
    return REGISTRY.get_sample_value("tuneloop_predict_errors_total", {"model": "m", "version": version}) or 0.0


def test_a_models_fault_is_counted_and_answered_though_another_text_of_the_request_was_bad():
    """One request, a text the tokenizer refuses and one the version fails on: the first
    failure alone was read, a 422, and the version's crash (or NaN) went uncounted in its
    health and unlogged."""
    replica, _, _ = _replica()
    real = replica._loaded.predict

    def picky(texts):
        if "bad" in texts:
            raise InputRejected("cannot tokenize it")
        if "boom" in texts:
            raise RuntimeError("the version crashed")
        if "nan" in texts:
            raise NonFiniteScores("scores are not finite")
        return real(texts)

    replica._loaded.predict = picky
    before = _errors("v1")
    with pytest.raises(InputRejected, match=r"inputs\[0\]: cannot tokenize"):
        asyncio.run(replica.predict(["bad", "fine"]))
    assert _errors("v1") == before  # the client's error alone
    with pytest.raises(InputRejected):  # both 422s: the first answers, and the NaN counts against v1
        asyncio.run(replica.predict(["bad", "nan"]))
    assert _errors("v1") == before + 1
    with pytest.raises(RuntimeError, match="the version crashed"):
        asyncio.run(replica.predict(["bad", "boom"]))
    assert _errors("v1") == before + 2


def test_a_failure_is_charged_to_the_version_whose_batch_raised_it():
    """A request admitted on v1 and computed on v2 (production changed while it queued)
    charged v2's crash to v1."""
    replica, _, _ = _replica()
    v2 = FakeModel("/weights/v2", "v2", replica.task, 64)

    def crashes(texts):
        raise RuntimeError("v2 cannot run")

    v2.predict = crashes
    before = (_errors("v1"), _errors("v2"))

    async def admitted_then_swapped():
        request = asyncio.ensure_future(replica.predict(["x"]))
        await asyncio.sleep(0)  # admitted on v1, queued for its batch
        replica._loaded = v2  # a promotion's swap, before the batch begins
        return await request

    with pytest.raises(RuntimeError, match="v2 cannot run"):
        asyncio.run(admitted_then_swapped())
    assert (_errors("v1"), _errors("v2")) == (before[0], before[1] + 1)


def _optimized(int8_passed: bool = True, folder: str = "artifacts", bf16_speed: float | None = None,
               lone_ms: dict[str, float] | None = None) -> Optimization:
    def record(runtime, passed, path=None):
        parity = ParityCheck(passed=passed, detail="test", rows=10, agreement=1.0 if passed else 0.5,
                             accuracy=0.9, reference_accuracy=0.9)
        return ArtifactRecord(runtime=runtime, path=f"{folder}/{runtime}/model.onnx" if path is None else path,
                              bytes=1, build_s=1.0, parity=parity)
    artifacts = {"onnx": record("onnx", True), "onnx-int8": record("onnx-int8", int8_passed)}
    speeds = {"torch": 100.0, "onnx": 120.0, "onnx-int8": 250.0}
    if bf16_speed is not None:
        artifacts["torch-bf16"] = record("torch-bf16", True, path="")
        speeds["torch-bf16"] = bf16_speed
    return Optimization(artifacts=artifacts, texts_per_s={f"{CPU}/1t": speeds},
                        lone_ms={f"{CPU}/1t": lone_ms} if lone_ms else {})


def test_a_build_recorded_between_the_replicas_two_reads_of_the_manifest_is_read_anew(tmp_path):
    """The folder held the new build while the manifest read next still named the old one,
    whose files were gone: the replica served torch for good."""
    (tmp_path / "v1/artifacts/b2/onnx-int8").mkdir(parents=True)
    (tmp_path / "v1/artifacts/b2/onnx-int8/model.onnx").write_bytes(b"int8")

    class Rebuilt(FakeRegistry):
        def __init__(self):
            super().__init__("v1")
            self.builds = [_optimized(folder="artifacts/b1"), _optimized(folder="artifacts/b2")]

        def manifest(self, model, version):
            self.optimization = self.builds.pop(0) if self.builds else self.optimization
            return SimpleNamespace(optimization=self.optimization)

        def local_path(self, model, version):
            return str(tmp_path / version)

    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": LABELS}],
                        "serving": {"num_cpus_per_replica": 1}})
    replica = ModelServer(cfg.model_dump(), "m", registry=Rebuilt(), recorder=FakeRecorder(),
                          shadow_recorder=FakeRecorder(), keys=object(), load=lambda *a: FakeModel(*a), watch=False)
    replica._sync_with_registry()
    assert (replica._loaded.runtime, replica._loaded.artifact) == ("onnx-int8", "artifacts/b2/onnx-int8/model.onnx")


def _unserved() -> None:
    """Every runtime row of model m's v1 at 0: the gauge is the process's, and an earlier
    test's replica left rows at 1 that a check of this one's would read."""
    from tuneloop.serving import metrics

    for runtime in ("torch", "onnx", "onnx-int8", "torch-bf16"):
        for texts in ("batches", "lone"):
            metrics.SERVING_RUNTIME.labels("m", "v1", runtime, texts).set(0)


def test_auto_serves_the_fastest_artifact_that_passed_parity_on_the_replicas_hardware():
    _unserved()
    replica, _, _ = _replica(optimization=_optimized(), num_cpus_per_replica=1)
    assert (replica._loaded.runtime, replica._loaded.artifact) == ("onnx-int8", "artifacts/onnx-int8/model.onnx")
    assert replica.status()["runtimes"]["v1"].startswith(f"onnx-int8 (auto: fastest on {CPU}/1t")
    assert REGISTRY.get_sample_value("tuneloop_serving_runtime",
                                     {"model": "m", "version": "v1", "runtime": "onnx-int8", "texts": "batches"}) == 1
    failed, _, _ = _replica(optimization=_optimized(int8_passed=False), num_cpus_per_replica=1)
    assert failed._loaded.runtime == "onnx"  # the faster int8 failed parity: never served
    # torch-bf16 has no file: the version's own weights, cast at load.
    bf16, _, _ = _replica(optimization=_optimized(int8_passed=False, bf16_speed=180.0), num_cpus_per_replica=1)
    assert (bf16._loaded.runtime, bf16._loaded.artifact) == ("torch-bf16", "")


def test_a_runtime_quicker_at_one_text_answers_lone_texts_beside_the_fastest_at_a_batch():
    lone = {"torch": 14.0, "onnx": 8.5, "onnx-int8": 6.2, "torch-bf16": 9.8}
    _unserved()
    replica, _, _ = _replica(optimization=_optimized(bf16_speed=300.0, lone_ms=lone), num_cpus_per_replica=1)
    assert replica._loaded.runtime == "torch-bf16"
    assert (replica._loaded.lone.runtime, replica._loaded.lone.artifact) == ("onnx-int8", "artifacts/onnx-int8/model.onnx")
    assert replica.status()["runtimes"]["v1"].endswith("; one text alone on onnx-int8 (6.2 ms against 9.8))")
    gauge = {(r, texts): REGISTRY.get_sample_value("tuneloop_serving_runtime",
                                                   {"model": "m", "version": "v1", "runtime": r, "texts": texts})
             for r, texts in [("torch-bf16", "batches"), ("onnx-int8", "lone")]}
    assert gauge == {("torch-bf16", "batches"): 1, ("onnx-int8", "lone"): 1}
    # Failed parity: never served, alone either; then fp32 ONNX is the quickest that passed.
    failed, _, _ = _replica(optimization=_optimized(int8_passed=False, bf16_speed=300.0, lone_ms=lone),
                            num_cpus_per_replica=1)
    assert failed._loaded.runtime == "torch-bf16" and failed._loaded.lone.runtime == "onnx"
    # Failed in batches, passed one text at a time: it answers lone texts only.
    alone = _optimized(int8_passed=False, bf16_speed=300.0, lone_ms=lone)
    alone.artifacts["onnx-int8"].lone_parity = alone.artifacts["onnx"].parity.model_copy(update={"rows": 100})
    lone_int8, _, _ = _replica(optimization=alone, num_cpus_per_replica=1)
    assert lone_int8._loaded.runtime == "torch-bf16" and lone_int8._loaded.lone.runtime == "onnx-int8"
    # Not a tenth quicker: one runtime, one copy of the weights.
    close, _, _ = _replica(optimization=_optimized(int8_passed=False, bf16_speed=300.0,
                                                   lone_ms={**lone, "onnx": 9.0}), num_cpus_per_replica=1)
    assert close._loaded.lone is None
    # A named runtime serves everything itself; so does a version measured before lone texts were.
    named, _, _ = _replica(optimization=_optimized(bf16_speed=300.0, lone_ms=lone), runtime="torch-bf16",
                           num_cpus_per_replica=1)
    assert named._loaded.runtime == "torch-bf16" and named._loaded.lone is None
    old, _, _ = _replica(optimization=_optimized(bf16_speed=300.0), num_cpus_per_replica=1)
    assert old._loaded.lone is None
    # Batches of one text at most: the batch runtime would never run, so it alone serves.
    single, _, _ = _replica(optimization=_optimized(bf16_speed=300.0, lone_ms=lone), num_cpus_per_replica=1,
                            max_batch_size=1)
    assert single._loaded.runtime == "torch-bf16" and single._loaded.lone is None


def test_an_artifact_that_did_not_load_is_not_loaded_again_for_lone_texts(caplog):
    opt = _optimized(folder="broken", lone_ms={"torch": 14.0, "onnx": 8.5, "onnx-int8": 6.2})
    replica, _, _ = _replica(optimization=opt, num_cpus_per_replica=1)
    assert replica._loaded.runtime == "torch"  # int8, the fastest, did not load: not tried twice
    assert replica._loaded.lone is None
    assert not [r for r in caplog.records if "for lone texts" in r.getMessage()]


def test_a_lone_text_runtime_that_does_not_load_leaves_the_version_on_one_runtime():
    opt = _optimized(bf16_speed=300.0, lone_ms={"torch": 14.0, "onnx": 8.5, "onnx-int8": 6.2, "torch-bf16": 9.8})
    opt.artifacts["onnx-int8"].path = "broken/onnx-int8/model.onnx"
    replica, _, _ = _replica(optimization=opt, num_cpus_per_replica=1)
    assert replica._loaded.runtime == "torch-bf16" and replica._loaded.lone is None
    assert "one text alone" not in replica.status()["runtimes"]["v1"]
    assert asyncio.run(replica.predict(["a"]))[0]["version"] == "v1"


def test_a_replica_on_hardware_no_one_measured_measures_the_runtimes_itself_and_records_them():
    """The job ran on another node (a GPU worker, a CPU of other threads): its replicas
    served PyTorch whatever the artifacts were worth here."""
    per_batch_s = {"torch": 0.004, "onnx": 0.002, "onnx-int8": 0.010}  # int8 slowest on this (fake) CPU
    loads: list[str] = []

    def load(*args):
        loads.append(args[4])
        return FakeModel(*args, delay_s=per_batch_s[args[4]])

    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": LABELS}],
                        "serving": {"max_batch_size": 8, "num_cpus_per_replica": 2},  # measured at 1 thread
                        "optimize": {"speed_seconds": 0.05}})
    registry = FakeRegistry("v1", _optimized())
    replica = ModelServer(cfg.model_dump(), "m", registry=registry, recorder=FakeRecorder(),
                          shadow_recorder=FakeRecorder(), keys=object(), load=load, watch=False)
    compute, tasks = replica._versions._compute, []
    replica._versions._compute = SimpleNamespace(
        submit=lambda f, *a: tasks.append((f.__name__, a[1] if f.__name__ == "measure_runtimes" else None))
        or compute.submit(f, *a))
    replica._sync_with_registry()
    # a task each: batches wait for one runtime's timing; then the one served warms up, there too
    assert tasks == [("measure_runtimes", [r]) for r in ("torch", "onnx", "onnx-int8")] + [("warm_up", None)]
    assert loads == ["torch", "onnx", "onnx-int8", "onnx"]  # each measured, then the fastest loaded to serve
    assert replica._loaded.runtime == "onnx"
    assert replica.status()["runtimes"]["v1"].startswith(f"onnx (auto: fastest on {CPU}/2t")
    speeds, lone = registry.recorded[f"{CPU}/2t"], registry.recorded_lone[f"{CPU}/2t"]
    assert speeds["onnx"] > speeds["torch"] > speeds["onnx-int8"] > 0
    assert 0 < lone["onnx"] < lone["torch"] < lone["onnx-int8"]  # one text alone: a batch's delay each
    assert registry.optimization.texts_per_s[f"{CPU}/1t"] == _optimized().texts_per_s[f"{CPU}/1t"]  # the job's kept
    # The next replica of the class reads them and measures nothing.
    loads.clear()
    ModelServer(cfg.model_dump(), "m", registry=registry, recorder=FakeRecorder(), shadow_recorder=FakeRecorder(),
                keys=object(), load=load, watch=False)._sync_with_registry()
    assert loads == ["onnx"]


def test_a_measurement_that_fails_leaves_the_version_served_by_the_speeds_it_had():
    """Storage refusing the record (or the golden rows unreadable) marked the whole version
    failed: a new replica served nothing until the retry, and measured again then."""
    class Refusing(FakeRegistry):
        def record_speeds(self, *args):
            raise RuntimeError("gave up after 30 conflicting writes")

    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": LABELS}],
                        "serving": {"max_batch_size": 8, "num_cpus_per_replica": 2},
                        "optimize": {"speed_seconds": 0.01}})
    replica = ModelServer(cfg.model_dump(), "m", registry=Refusing("v1", _optimized()), recorder=FakeRecorder(),
                          shadow_recorder=FakeRecorder(), keys=object(), load=lambda *a: FakeModel(*a), watch=False)
    replica._sync_with_registry()
    assert replica._loaded.version == "v1" and replica._loaded.runtime == "torch"
    assert f"no runtime measured on {CPU}/2t" in replica.status()["runtimes"]["v1"]


def test_with_measuring_off_auto_serves_torch_where_the_speeds_were_measured_on_other_hardware():
    replica, _, _ = _replica(optimization=_optimized(), num_cpus_per_replica=2, measure=False)  # measured at 1 thread
    assert replica._loaded.runtime == "torch"
    assert f"no runtime measured on {CPU}/2t" in replica.status()["runtimes"]["v1"]


def test_a_named_runtime_serves_when_it_passed_and_torch_otherwise():
    named, _, _ = _replica(optimization=_optimized(), runtime="onnx", num_cpus_per_replica=1)
    assert named._loaded.runtime == "onnx"
    failed, _, _ = _replica(optimization=_optimized(int8_passed=False), runtime="onnx-int8")
    assert failed._loaded.runtime == "torch"
    assert "failed parity" in failed.status()["runtimes"]["v1"]
    plain, _, _ = _replica(optimization=None, runtime="onnx")
    assert plain._loaded.runtime == "torch"


def test_an_artifact_that_does_not_load_leaves_the_version_serving_on_torch():
    replica, _, _ = _replica(optimization=_optimized(folder="broken"), num_cpus_per_replica=1)
    assert replica._loaded.runtime == "torch" and replica._loaded.version == "v1"
    assert replica.status()["runtimes"]["v1"] == "torch (the onnx-int8 artifact did not load: RuntimeError)"
    # Tried again, backing off (a load that met another replica's refresh mid-rename stayed
    # on torch until a restart): still broken, torch serves on; loadable, the artifact swaps in.
    versions = replica._versions
    versions.next_rebuild_check, versions.rebuild_retry = 0.0, {key: (0.0, n) for key, (_, n) in
                                                                 versions.rebuild_retry.items()}
    replica._pick_up_rebuilds()
    assert replica._loaded.runtime == "torch" and all(at > time.monotonic() for at, _ in versions.rebuild_retry.values())

    def loads_now(path, version, task, max_length, runtime="torch", artifact=None):
        return FakeModel(path, version, task, max_length, runtime, artifact and artifact.replace("broken", "fixed"))

    versions.load_model = loads_now
    versions.next_rebuild_check, versions.rebuild_retry = 0.0, {key: (0.0, n) for key, (_, n) in
                                                                 versions.rebuild_retry.items()}
    replica._pick_up_rebuilds()
    assert replica._loaded.runtime == "onnx-int8" and "did not load" not in replica.status()["runtimes"]["v1"]
    versions.next_rebuild_check = 0.0
    replica._pick_up_rebuilds()  # served as built: no more tries
    assert replica._loaded.runtime == "onnx-int8" and not versions.fell_back
    assert asyncio.run(replica.predict(["a"]))[0]["version"] == "v1"


def test_a_version_optimized_again_is_swapped_onto_the_new_builds_runtime():
    """`tuneloop optimize` on the production version reached replicas only at their restart."""
    first = _optimized(int8_passed=False, folder="artifacts/b1").model_copy(update={"built_at": "b1"})
    replica, registry, _ = _replica(optimization=first, num_cpus_per_replica=1)
    serving = replica._loaded
    assert serving.runtime == "onnx"
    replica._pick_up_rebuilds()  # before REBUILD_CHECK_S: not even read
    registry.optimization = _optimized(folder="artifacts/b2").model_copy(update={"built_at": "b2"})
    replica._versions.next_rebuild_check = 0.0
    replica._pick_up_rebuilds()
    assert (replica._loaded.runtime, replica._loaded.artifact) == ("onnx-int8", "artifacts/b2/onnx-int8/model.onnx")
    assert replica._loaded is not serving and replica._loaded.version == "v1"
    assert asyncio.run(replica.predict(["a"]))[0]["version"] == "v1"
    gauge = {r: REGISTRY.get_sample_value("tuneloop_serving_runtime",
                                          {"model": "m", "version": "v1", "runtime": r, "texts": "batches"})
             for r in ("onnx", "onnx-int8")}
    assert gauge == {"onnx": 0, "onnx-int8": 1}
    # The same build: nothing loads again.
    now = replica._loaded
    replica._versions.next_rebuild_check = 0.0
    replica._pick_up_rebuilds()
    assert replica._loaded is now
    # A build that does not load leaves the one serving, and is tried again after a wait.
    registry.optimization = registry.optimization.model_copy(update={"built_at": "b3"})
    load, loads = replica._versions.load_model, []

    def out_of_reach(*args):
        loads.append(args[4])
        raise OSError("the bucket is out of reach")

    replica._versions.load_model = out_of_reach
    replica._versions.next_rebuild_check = 0.0
    replica._pick_up_rebuilds()
    assert replica._loaded is now and replica._versions.built_at["v1"] == "b2" and loads == ["onnx-int8"]
    replica._versions.next_rebuild_check = 0.0
    replica._pick_up_rebuilds()
    assert loads == ["onnx-int8"]  # within its wait: not again
    replica._versions.load_model = load
    replica._versions.rebuild_retry[("v1", "b3")] = (0.0, 1)  # the wait over, the bucket back
    replica._versions.next_rebuild_check = 0.0
    replica._pick_up_rebuilds()
    assert replica._loaded is not now and replica._versions.built_at["v1"] == "b3"


def test_a_rebuild_whose_artifact_does_not_load_leaves_the_artifact_serving_not_pytorch():
    """A replica's ONNX Runtime that cannot read the new build (built with a newer one) fell
    back to PyTorch at half the speed, while the earlier build's session worked."""
    first = _optimized(folder="artifacts/b1").model_copy(update={"built_at": "b1"})
    replica, registry, _ = _replica(optimization=first, num_cpus_per_replica=1)
    serving = replica._loaded
    assert serving.runtime == "onnx-int8"
    registry.optimization = _optimized(folder="broken").model_copy(update={"built_at": "b2"})
    replica._versions.next_rebuild_check = 0.0
    replica._pick_up_rebuilds()
    assert replica._loaded is serving and replica._versions.runtimes["v1"][0] == "onnx-int8"
    assert ("v1", "b2") in replica._versions.rebuild_retry


def test_a_rebuild_waits_while_a_rollout_holds_two_versions():
    """Reloading either would make three versions resident."""
    replica, registry, _ = _replica(optimization=_optimized().model_copy(update={"built_at": "b1"}),
                                    num_cpus_per_replica=1)
    replica._challenger = FakeModel("/weights/v2", "v2", replica.task, 64)
    registry.manifest = lambda *a: pytest.fail("read a manifest")
    replica._versions.next_rebuild_check = 0.0
    replica._pick_up_rebuilds()
    assert replica._versions.next_rebuild_check > time.monotonic()  # looked again at the next check


@pytest.mark.parametrize("serving", [{"runtime": "torch"}, {"num_gpus_per_replica": 1}])
def test_where_no_build_changes_what_serves_no_manifest_is_read_for_rebuilds(serving):
    replica, registry, _ = _replica(optimization=_optimized(), **serving)
    registry.manifest = lambda *a: pytest.fail("read a manifest")
    replica._versions.next_rebuild_check = 0.0
    replica._pick_up_rebuilds()
    assert replica._loaded.runtime == "torch"


def test_a_replicas_request_series_exist_at_zero_before_their_first_request():
    """Born at its first increment, a series lost that increment to rate() and increase(): a
    new canary's first error or timeout never showed."""
    cfg = parse_config({"models": [{"name": "zeroed", "base_model": "x", "labels": LABELS}]})
    ModelServer(cfg.model_dump(), "zeroed", registry=FakeRegistry("v7"), recorder=FakeRecorder(),
                shadow_recorder=FakeRecorder(), keys=object(), load=lambda *a: FakeModel(*a),
                watch=False)._sync_with_registry()
    for version, outcome in [("v7", "ok"), ("v7", "timeout"), ("none", "rejected"), ("none", "unavailable"),
                             ("none", "invalid"), ("none", "error")]:
        assert REGISTRY.get_sample_value("tuneloop_requests_total",
                                         {"model": "zeroed", "version": version, "outcome": outcome}) == 0
    assert REGISTRY.get_sample_value("tuneloop_predict_errors_total", {"model": "zeroed", "version": "v7"}) == 0

"""`tuneloop optimize` on a real version (a tiny BERT exported by torch's dynamo exporter,
quantized by ONNX Runtime), its record in the manifest, and a replica serving the ONNX
artifact over real HTTP with the PyTorch version's answers."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
import yaml

from tests.integration.conftest import PREDICT_KEY, bearer, make_config, publish_version, served

TEXTS = ["the film was great", "the meal was awful", "a phone", "the hotel was lovely and the song was poor"]


@pytest.fixture(scope="module")
def optimized(tmp_path_factory, tiny_model, seed_tsv):
    from typer.testing import CliRunner

    from tuneloop.control.cli import app
    from tuneloop.core.tasks import model_task
    from tuneloop.store.registry import Registry
    from tuneloop.store.storage import Storage
    from tuneloop.training.data import read_dataset

    tmp_path = tmp_path_factory.mktemp("optimize")
    cfg = make_config(tmp_path / "store", tiny_model, seed_tsv, serving={"runtime": "onnx"},
                      optimize={"speed_seconds": 0.2})
    version = publish_version(cfg, tiny_model)
    registry = Registry(Storage(cfg.storage.root))
    golden = registry.freeze_golden("sentiment", read_dataset(seed_tsv, model_task(cfg.models[0])))
    config = tmp_path / "tuneloop.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True)))
    shown = CliRunner().invoke(app, ["optimize", "sentiment", version, "-c", str(config)])
    assert shown.exit_code == 0, shown.output
    return cfg, registry, version, golden, shown.output


def test_optimize_records_checked_artifacts_in_the_manifest(optimized):
    from tuneloop.serving.loaded_models import cpu_class

    cfg, registry, version, golden, output = optimized
    optimization = registry.manifest("sentiment", version).optimization
    assert set(optimization.artifacts) == {"onnx", "onnx-int8", "torch-bf16"}
    onnx = optimization.artifacts["onnx"]
    # fp32 ONNX answers every golden row as PyTorch does.
    assert onnx.parity.passed and onnx.parity.rows == golden.num_rows and onnx.parity.agreement == 1.0
    assert onnx.parity.accuracy == onnx.parity.reference_accuracy
    folder = registry.local_path("sentiment", version)
    for name in ("onnx", "onnx-int8"):
        record = optimization.artifacts[name]
        assert os.path.getsize(os.path.join(folder, record.path)) == record.bytes > 0
    assert optimization.artifacts["onnx-int8"].bytes < onnx.bytes  # int8 weights
    # Smoothed before int8, calibrated on the golden texts: this version was published without its training rows.
    settings = dict(optimization.artifacts["onnx-int8"].settings)
    assert settings.pop("smoothed_matmuls") >= 6  # a layer's q, k, v, output and two feed-forward MatMuls, at least
    assert settings == {
        "weights": "int8, a scale per output channel", "activations": "uint8, a scale per batch", "smoothing_alpha": 0.8,
        "calibration": "golden", "calibration_rows": min(256, golden.num_rows)}
    bf16 = optimization.artifacts["torch-bf16"]  # no file: the weights, cast at load
    if cpu_class() == "cpu-bf16":
        assert bf16.path == "" and bf16.parity.rows == golden.num_rows and 0 < bf16.bytes < onnx.bytes
    else:
        assert not bf16.parity.passed and "no native bf16" in bf16.parity.detail
    speeds = optimization.texts_per_s[f"{cpu_class()}/1t"]  # the config's replicas: 1 CPU each
    assert speeds["torch"] > 0 and speeds["onnx"] > 0
    lone = optimization.lone_ms[f"{cpu_class()}/1t"]  # one text alone, each runtime that passed
    assert set(speeds) <= set(lone) and min(lone.values()) > 0
    # Each ONNX artifact's parity on the short golden rows, one at a time: what a lone-text runtime is judged by.
    for name in ("onnx", "onnx-int8"):
        alone = optimization.artifacts[name].lone_parity
        assert 0 < alone.rows <= golden.num_rows and alone.passed  # the short rows (all of this seed's)
    assert bf16.lone_parity is None
    assert '"onnx-int8"' in output  # the CLI prints the record


def test_a_replica_serves_the_onnx_artifact_with_pytorchs_answers(optimized, metrics_dir, serve_port):
    from ray.serve.handle import DeploymentHandle

    from tuneloop.core.names import model_app_name, model_deployment_name
    from tuneloop.core.tasks import model_task
    from tuneloop.serving.loaded_models import LoadedModel

    cfg, registry, version, _, _ = optimized
    reference = LoadedModel(registry.local_path("sentiment", version), version, model_task(cfg.models[0]),
                            cfg.serving.max_length)
    expected, _, _ = reference.predict(TEXTS)
    with served(cfg, metrics_dir, serve_port) as url:
        async def replica_status() -> dict:
            # Serve's handles route on the caller's event loop (throughput-optimized mode).
            handle = DeploymentHandle(model_deployment_name("sentiment"), model_app_name("sentiment"))
            try:
                return await handle.status.remote()
            finally:
                await handle.shutdown_async()

        status = asyncio.run(replica_status())
        assert status["runtimes"][version].startswith("onnx (serving.runtime is onnx")
        r = httpx.post(f"{url}/v1/models/sentiment/predict", json={"inputs": TEXTS}, headers=bearer(PREDICT_KEY),
                       timeout=30)
    assert r.status_code == 200, r.text
    answers = r.json()["predictions"]
    assert [a["version"] for a in answers] == [version] * len(TEXTS)
    for got, want in zip(answers, expected, strict=True):
        assert got["label"] == want["label"]
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)


def test_a_lone_text_is_answered_by_the_lone_runtime_and_a_batch_by_the_versions_own(optimized):
    from tuneloop.core.tasks import model_task
    from tuneloop.serving.loaded_models import load_model

    cfg, registry, version, _, _ = optimized
    path, task = registry.local_path("sentiment", version), model_task(cfg.models[0])
    onnx = registry.manifest("sentiment", version).optimization.artifacts["onnx"]
    served = load_model(path, version, task, cfg.serving.max_length)
    alone = load_model(path, version, task, cfg.serving.max_length, "onnx", onnx.path)
    expected = served.predict(TEXTS[:1])[0]
    weights = served.weight_bytes
    served.answer_lone_texts_with(alone)
    assert served.weight_bytes == weights + alone.weight_bytes  # the replica holds both
    forwarded, forward = [], alone._forward
    alone._forward = lambda enc: forwarded.append(len(enc["input_ids"])) or forward(enc)
    got = served.predict(TEXTS[:1])[0]
    assert forwarded == [1] and got[0]["label"] == expected[0]["label"]
    assert got[0]["scores"] == pytest.approx(expected[0]["scores"], abs=1e-5)  # parity: fp32 ONNX, the same answer
    assert len(served.predict(TEXTS)[0]) == len(TEXTS) and forwarded == [1]  # a batch: the version's own runtime
    served.predict([" ".join(TEXTS * 3)])  # one text past LONE_MAX_TOKENS: the version's own runtime too
    assert forwarded == [1]
    # Non-finite scores from the lone runtime (int8's scales on one text): the version's own answers.
    import torch

    alone._forward = lambda enc: torch.full((1, len(served.head)), float("nan"))
    got = served.predict(TEXTS[:1])[0]
    assert got[0]["label"] == expected[0]["label"]
    assert got[0]["scores"] == pytest.approx(expected[0]["scores"], abs=1e-5)


def test_a_replica_of_a_class_no_one_measured_ranks_the_runtimes_itself(optimized, metrics_dir):
    """The job measured on another node (here: a GPU's class, as a job on a GPU worker
    records): the replica measures PyTorch and the artifacts that passed on its own CPU,
    serves the fastest, and records the speeds for the next replica of its class."""
    import torch

    from tuneloop.core.runtimes import choose_runtime
    from tuneloop.serving.loaded_models import cpu_class
    from tuneloop.serving.model_server import ModelServer

    cfg, registry, version, _, _ = optimized
    elsewhere = {"NVIDIA H100 80GB HBM3": {"torch": 5000.0}}
    registry._update_manifest("sentiment", version, lambda m: m.model_copy(update={
        "optimization": m.optimization.model_copy(update={"texts_per_s": elsewhere})}))
    config = cfg.model_dump(mode="json")
    config["serving"]["runtime"] = "auto"
    config["optimize"]["speed_seconds"] = 0.3
    threads = torch.get_num_threads()
    replica = ModelServer(config, "sentiment", watch=False)
    try:
        replica._sync_with_registry()
        optimization = registry.manifest("sentiment", version).optimization
        here = f"{cpu_class()}/1t"
        passed = {name for name, record in optimization.artifacts.items() if record.parity.passed}
        assert set(optimization.texts_per_s) == {*elsewhere, here}
        assert set(optimization.texts_per_s[here]) == {"torch", *passed}
        assert min(optimization.texts_per_s[here].values()) > 0
        assert set(optimization.lone_ms[here]) == {"torch", *passed} and min(optimization.lone_ms[here].values()) > 0
        served = replica._versions.runtimes[version]
        assert served[0] == choose_runtime("auto", optimization, here)[0]
        assert replica._loaded.runtime == served[0]
        r = asyncio.run(replica.predict(TEXTS))
        assert [a["version"] for a in r] == [version] * len(TEXTS)
    finally:
        replica.__del__()
        torch.set_num_threads(threads)


def test_a_version_optimized_again_is_swapped_onto_its_new_build(optimized, metrics_dir, tmp_path):
    """`tuneloop optimize` run again on a version being served: the replica loads the new
    build's artifact and swaps it in (the old build's files are removed by the record),
    answering throughout in its one event loop as Serve runs it."""
    import torch
    from typer.testing import CliRunner

    from tuneloop.control.cli import app
    from tuneloop.serving.model_server import ModelServer

    cfg, registry, version, _, _ = optimized
    config = tmp_path / "tuneloop.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True)))
    threads = torch.get_num_threads()
    replica = ModelServer(cfg.model_dump(mode="json"), "sentiment", watch=False)  # serving.runtime: onnx

    def optimize_again():
        shown = CliRunner().invoke(app, ["optimize", "sentiment", version, "-c", str(config)])
        assert shown.exit_code == 0, shown.output

    async def served_across_the_rebuild():
        expected = await replica.predict(TEXTS)
        await asyncio.to_thread(optimize_again)
        replica._versions.next_rebuild_check = 0.0
        await asyncio.to_thread(replica._pick_up_rebuilds)  # the registry watcher's thread
        return expected, await replica.predict(TEXTS)

    try:
        replica._sync_with_registry()
        before = replica._loaded
        assert before.runtime == "onnx"
        expected, answers = asyncio.run(served_across_the_rebuild())
        folder = registry.local_path("sentiment", version)
        assert not os.path.exists(os.path.join(folder, before.artifact))  # the earlier build is gone
        after = replica._loaded
        assert after is not before and after.runtime == "onnx" and after.artifact != before.artifact
        assert after.artifact == registry.manifest("sentiment", version).optimization.artifact_path("onnx")
        assert [a["label"] for a in answers] == [a["label"] for a in expected]
        assert {a["version"] for a in answers} == {version}
    finally:
        replica.__del__()
        torch.set_num_threads(threads)

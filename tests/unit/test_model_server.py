"""The model replica's decisions with a real tokenizer and a tiny real model, no Ray: a bad
input fails its own request only, answers are labelled by the checkpoint, and a version
whose labels disagree with the config is refused while the loaded one keeps serving."""

from __future__ import annotations

import asyncio

import pytest

from tuneloop.core.config import parse_config
from tuneloop.core.errors import InputRejected
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage
from tuneloop.serving.loaded_models import LabelMismatch, checkpoint_labels
from tuneloop.serving.model_server import ModelServer, request_outcome
from tests.tiny_models import build_tiny_model

LABELS = ["negative", "positive"]


def _publish(registry: Registry, weights: str) -> str:
    manifest = registry.publish("sentiment", weights, Manifest(
        version="pending", model="sentiment", parent=None, base_model=weights, task="text-classification",
        labels=LABELS))
    registry.promote("sentiment", manifest.version, reason="test")
    return manifest.version


@pytest.fixture
def server(tmp_path):
    weights = build_tiny_model(tmp_path / "tiny", LABELS)
    cfg = parse_config({
        "models": [{"name": "sentiment", "base_model": weights, "labels": LABELS}],
        "storage": {"root": str(tmp_path / "store")},
        "serving": {"max_batch_size": 32, "reload_interval_s": 600, "num_cpus_per_replica": 1},
    })
    registry = Registry(Storage(cfg.storage.root))
    _publish(registry, weights)
    replica = ModelServer(cfg.model_dump(), "sentiment")
    yield replica, registry, tmp_path
    replica.__del__()


def test_a_bad_input_fails_its_own_request_and_its_batch_mates_succeed(server):
    replica, _, _ = server

    async def main():
        good = [asyncio.create_task(replica.predict([f"good text {i}", "another"])) for i in range(12)]
        bad = asyncio.create_task(replica.predict(["fine", "\ud800"]))  # the tokenizer raises on it
        more = [asyncio.create_task(replica.predict([f"more {i}"])) for i in range(12)]
        outcome = await asyncio.gather(bad, return_exceptions=True)
        return outcome[0], await asyncio.gather(*good), await asyncio.gather(*more)

    bad, good, more = asyncio.run(main())
    assert isinstance(bad, InputRejected) and bad.status == 422 and bad.message.startswith("inputs[1]:")
    assert all(len(r) == 2 and r[0]["version"] == "v1" for r in good)
    assert all(len(r) == 1 for r in more)


def test_non_finite_scores_are_the_inputs_422_and_the_versions_error(server):
    """A version scoring a text as NaN (fp16 overflow) was counted nowhere: a canary doing
    so looked healthy to its rollout."""
    from prometheus_client import REGISTRY

    from tuneloop.core.errors import NonFiniteScores

    replica, _, _ = server
    loaded, real = replica._loaded, replica._loaded.predict

    def predict(texts):
        if "overflow" in texts:
            raise NonFiniteScores("the model produced non-finite scores for this input")
        return real(texts)

    loaded.predict = predict
    before = REGISTRY.get_sample_value("tuneloop_predict_errors_total", {"model": "sentiment", "version": "v1"}) or 0
    with pytest.raises(InputRejected) as e:
        asyncio.run(replica.predict(["fine", "overflow"]))
    assert e.value.status == 422 and e.value.message.startswith("inputs[1]: the model produced non-finite")
    after = REGISTRY.get_sample_value("tuneloop_predict_errors_total", {"model": "sentiment", "version": "v1"})
    assert after == before + 1
    assert request_outcome(e.value) == "error"  # the request counts as the version's fault, not the client's


def test_a_refused_requests_outcome_tells_overload_from_unavailable_and_the_clients_error():
    """Every 503 counted as overload: a version that failed to load answered 503 not_ready to
    every request, and only the overload alert (add replicas) fired."""
    from tuneloop.core.errors import InvalidBody, NotReady, Overloaded, StorageUnavailable, TimedOut

    assert request_outcome(Overloaded("at capacity")) == "rejected"
    assert request_outcome(TimedOut("slow", "v1")) == "rejected"  # __call__ counts it as timeout first
    assert request_outcome(NotReady("no version")) == "unavailable"
    assert request_outcome(StorageUnavailable("disk")) == "unavailable"
    assert request_outcome(InvalidBody("bad")) == "invalid"


def test_a_replica_notes_each_version_it_starts_serving(server):
    replica, registry, tmp_path = server
    assert len(registry.switches("sentiment", "v1")) == 1  # loaded at start: the rollout's end is timed by it
    assert _publish(registry, str(tmp_path / "tiny")) == "v2"
    replica._sync_with_registry()
    replica._sync_with_registry()  # once per replica and version
    assert len(registry.switches("sentiment", "v2")) == 1 and replica.status()["version"] == "v2"


def test_answers_use_the_checkpoints_label_order(server):
    replica, registry, tmp_path = server
    # A head trained with the labels the other way round, and a bias that makes id 0 win.
    reordered = build_tiny_model(tmp_path / "reordered", ["positive", "negative"], bias=[5.0, -5.0])
    version = _publish(registry, reordered)
    replica._sync_with_registry()
    [answer] = asyncio.run(replica.predict(["anything"]))
    assert answer["version"] == version and answer["label"] == "positive"  # id 0 of *this* checkpoint
    assert answer["scores"]["positive"] > 0.99


def test_a_version_with_other_labels_is_refused_and_the_loaded_one_keeps_serving(server):
    replica, registry, tmp_path = server
    three = build_tiny_model(tmp_path / "three", ["negative", "neutral", "positive"])
    bad = _publish(registry, three)
    replica._sync_with_registry()
    assert replica.status()["version"] == "v1"
    assert "neutral" in replica.status()["refused"][bad]
    [answer] = asyncio.run(replica.predict(["still served"]))
    assert answer["version"] == "v1"


def test_checkpoint_labels_are_checked_as_a_set_and_kept_in_checkpoint_order():
    assert checkpoint_labels({1: "a", 0: "b"}, ["a", "b"], "v1") == ["b", "a"]
    assert checkpoint_labels({"0": "a", "1": "b"}, ["b", "a"], "v1") == ["a", "b"]
    with pytest.raises(LabelMismatch, match=r"v3's checkpoint has labels \['LABEL_0', 'LABEL_1'\]"):
        checkpoint_labels({0: "LABEL_0", 1: "LABEL_1"}, ["a", "b"], "v3")


def test_adaptive_batching_times_a_batch_not_its_wait_for_the_compute_thread(server):
    """Production's and a canary's batches (and shadow runs) share one compute thread: a
    batch that waited behind another's counted the wait as its own latency, and the limit
    shrank for work that was not its."""
    import time as clock

    replica, _, _ = server
    assert replica.serving.adaptive_batching
    limit = replica._batcher.max_batch_size

    async def main():
        blocked = asyncio.get_running_loop().run_in_executor(replica._compute, clock.sleep,
                                                            3 * replica.serving.target_batch_latency_s)
        await replica.predict(["waits behind a long batch"])
        await blocked

    asyncio.run(main())
    assert replica._batcher.max_batch_size >= limit


def test_serve_waits_for_a_replicas_requests_and_log_flush_before_it_kills_it():
    """Serve's 20 s default cut off requests of the 30 s request timeout as resets when a
    replica was stopped (a config change, a scale down), and could kill it before its
    prediction log's flush."""
    from tuneloop.core.config import parse_config
    from tuneloop.serving.app import model_app

    cfg = parse_config({"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"]}],
                        "serving": {"num_replicas": 1, "request_timeout_s": 120}})
    options = model_app(cfg, "m", None)._bound_deployment._deployment_config  # no Ray started: the options alone
    assert options.graceful_shutdown_timeout_s >= cfg.serving.body_timeout_s + 120 + 5


def test_a_token_classifiers_windows_run_in_passes_of_at_most_max_rows_with_the_same_answers(tmp_path):
    """A batch of long texts is many windows: 32 texts of 2,000 characters went through one
    forward pass as 672 rows, past what max_batch_size bounds."""
    from tuneloop.core.tasks import make_task
    from tuneloop.serving.loaded_models import load_model

    task = make_task("token-classification", ["PER", "LOC"])
    weights = build_tiny_model(tmp_path / "ner", ["PER", "LOC"], task="token-classification")
    texts = [" ".join(f"Ada{i} went to Paris{j}" for j in range(40)) for i in range(3)]
    whole = load_model(weights, "v1", task, 16)
    passes = load_model(weights, "v1", task, 16, max_rows=4)
    seen = []
    forward = passes._forward
    passes._forward = lambda enc: seen.append(int(enc["input_ids"].shape[0])) or forward(enc)
    chunked, once = passes.predict(texts)[0], whole.predict(texts)[0]
    spans = [[(e["start"], e["end"], e["label"]) for e in a["entities"]] for a in chunked]
    assert spans == [[(e["start"], e["end"], e["label"]) for e in a["entities"]] for a in once]
    assert [e["score"] for a in chunked for e in a["entities"]] == \
        pytest.approx([e["score"] for a in once for e in a["entities"]], abs=1e-5)  # another batch size's arithmetic
    assert len(seen) > 3 and max(seen) == 4  # many windows, never more than 4 rows a pass


@pytest.mark.parametrize("task_name, labels", [("text-classification", ["neg", "pos"]),
                                               ("token-classification", ["PER", "LOC"])])
def test_a_batch_runs_in_passes_by_length_each_padded_to_its_longest_with_the_same_answers(tmp_path, task_name, labels):
    """Padded whole, a 3-token text beside a 60-token one cost 60 tokens; in passes by
    length (``forward_passes``) the short texts run apart, no wider than they are."""
    from tuneloop.core.tasks import make_task
    from tuneloop.serving.loaded_models import load_model

    task = make_task(task_name, labels)
    weights = build_tiny_model(tmp_path / "m", labels, task=task_name)
    texts = ["Ada went home", " ".join(["Paris"] * 50), "Bob ran", " ".join(["Rome"] * 45), "ok"]
    by_length = load_model(weights, "v1", task, 64)
    whole = load_model(weights, "v1", task, 64)
    whole.passes_by_length = False
    widths = []
    forward = by_length._forward
    by_length._forward = lambda enc: widths.append(tuple(enc["input_ids"].shape)) or forward(enc)
    (answers, tokens, padded), (once, tokens_once, padded_once) = by_length.predict(texts), whole.predict(texts)
    assert len(widths) == 2 and sorted(rows for rows, _ in widths) == [2, 3]  # short and long apart
    assert tokens == tokens_once and padded < 0.7 * padded_once == 0.7 * len(texts) * max(w for _, w in widths)
    if task_name == "text-classification":
        assert [a["label"] for a in answers] == [a["label"] for a in once]
        assert [a["score"] for a in answers] == pytest.approx([a["score"] for a in once], abs=1e-5)
    else:
        assert [[(e["start"], e["end"], e["label"]) for e in a["entities"]] for a in answers] == \
            [[(e["start"], e["end"], e["label"]) for e in a["entities"]] for a in once]


def test_a_tokenizer_that_pads_on_the_left_runs_its_batch_in_one_pass_as_wide_as_the_batch(tmp_path):
    """Cutting a left-padded pass to its longest row would cut real tokens and move the rest."""
    import json

    from tuneloop.core.tasks import make_task
    from tuneloop.serving.loaded_models import load_model

    weights = build_tiny_model(tmp_path / "m", ["neg", "pos"])
    config = tmp_path / "m" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "padding_side": "left"}))
    loaded = load_model(weights, "v1", make_task("text-classification", ["neg", "pos"]), 64)
    widths = []
    forward = loaded._forward
    loaded._forward = lambda enc: widths.append(tuple(enc["input_ids"].shape)) or forward(enc)
    texts = ["Ada went home", " ".join(["Paris"] * 50), "ok"]
    _, tokens, padded = loaded.predict(texts)
    assert loaded.tokenizer.padding_side == "left" and widths == [(3, widths[0][1])]
    assert padded == 3 * widths[0][1] > tokens

"""Named-entity recognition end to end on a tiny random-init token classifier: v1 trains
through Ray Train on a CoNLL-layout seed file, the replica answers entities with character
offsets over real HTTP (a text past max_length too, in windows: what the trained tiny model tags
there varies from run to run, so that every window is read is checked in
``test_token_classification.py`` on a model that tags every word), corrected entity lists
are stored as feedback, bad spans get 422 and nothing stored, and the statistics count
entity types."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from tests.integration.conftest import ADMIN_KEY, FEEDBACK_KEY, bearer, make_config, trained_and_served
from tests.tiny_models import build_tiny_model

TYPES = ["PER", "LOC"]
BIO_TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]  # the config names the types by their tags, a form it takes
NAMES = ["Ada", "Grace", "Alan", "Linus", "Barbara", "Ken"]
CITIES = ["Paris", "Berlin", "Lisbon", "Oslo", "Cairo", "Lima"]
TEMPLATES = [["{n}", "flew", "to", "{c}"], ["{n}", "lives", "in", "{c}"], ["we", "met", "{n}", "in", "{c}", "today"],
             ["nothing", "happened", "here"]]


@pytest.fixture(scope="module")
def seed_conll(tmp_path_factory) -> str:
    """Sentences as CoNLL gives them: tokens and BIO tags, one JSON object a line."""
    rng, lines = random.Random(0), []
    for _ in range(48):
        n, c = rng.choice(NAMES), rng.choice(CITIES)
        template = rng.choice(TEMPLATES)
        tokens = [w.format(n=n, c=c) for w in template]
        tags = ["B-PER" if w == "{n}" else "B-LOC" if w == "{c}" else "O" for w in template]
        lines.append(json.dumps({"tokens": tokens, "tags": tags}))
    path = tmp_path_factory.mktemp("ner-seed") / "seed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def ner(ray_session, serve_port, metrics_dir, seed_conll, tmp_path_factory):
    base = build_tiny_model(tmp_path_factory.mktemp("tiny-ner"), TYPES, task="token-classification")
    cfg = make_config(tmp_path_factory.mktemp("store"), base, seed_conll,
                      model={"name": "ner", "task": "token-classification", "labels": BIO_TAGS},
                      serving={"max_length": 16, "max_chars_per_input": 2000},
                      # Trained at 8 tokens: the longer seed sentences train as a row per window.
                      training={"epochs": 2, "learning_rate": 5e-3, "max_length": 8})
    with trained_and_served(cfg, "ner", metrics_dir, serve_port) as (url, outcome):
        yield url, cfg, outcome


def test_v1_trains_on_conll_tokens_and_is_scored_by_entity_f1(ner):
    _, _, outcome = ner
    assert outcome.job.state == "succeeded" and outcome.job.version == "v1", outcome.job.model_dump()
    metrics = outcome.manifest.metrics
    assert 0 <= metrics.f1 <= 1 and set(metrics.per_class) <= set(TYPES) and metrics.eval_rows > 0
    assert outcome.manifest.data["golden"]["rows"] > 0  # a stratified sample of the seed, frozen


def test_the_model_list_gives_the_entity_types_answers_and_feedback_use(ner):
    url, _, _ = ner
    listed = {m["name"]: m for m in httpx.get(f"{url}/v1/models", timeout=30).json()["models"]}
    assert listed["ner"]["labels"] == TYPES  # not the config's BIO_TAGS: feedback naming B-PER is refused


def test_predictions_are_entities_with_offsets_also_for_a_text_past_max_length(ner):
    url, _, _ = ner
    long_text = " ".join(f"{n} met {c}" for n, c in zip(NAMES * 3, CITIES * 3, strict=True))  # ~100 tokens
    r = httpx.post(f"{url}/v1/models/ner/predict", json={"inputs": ["Ada flew to Paris", long_text]}, timeout=60)
    assert r.status_code == 200, r.text
    answers = r.json()["predictions"]
    assert any(a["entities"] for a in answers)  # the offsets checked below are there to check
    for text, answer in zip(["Ada flew to Paris", long_text], answers, strict=True):
        assert answer["version"] == "v1" and set(answer) == {"id", "version", "entities"}
        ends = [0]
        for e in answer["entities"]:
            assert text[e["start"]:e["end"]] == e["text"] and e["label"] in TYPES and 0 < e["score"] <= 1
            assert e["start"] >= ends[-1]  # in text order, never overlapping
            ends.append(e["end"])


def test_corrected_entities_are_feedback_and_bad_spans_are_refused(ner):
    url, _, _ = ner
    with httpx.Client(base_url=url, timeout=60) as c:
        [answer] = c.post("/v1/models/ner/predict", json={"inputs": ["Grace lives in Oslo"]}).json()["predictions"]
        right = [{"start": 0, "end": 5, "label": "PER"}, {"start": 15, "end": 19, "label": "LOC", "text": "Oslo"}]
        stored = c.post("/v1/feedback", json={"prediction_id": answer["id"], "entities": right},
                        headers=bearer(FEEDBACK_KEY))
        assert stored.status_code == 202, stored.text
        on_text = c.post("/v1/feedback", json={"model": "ner", "text": "Ken is in Lima", "entities": []},
                         headers=bearer(FEEDBACK_KEY))
        assert on_text.status_code == 202, on_text.text
        before = c.get("/v1/models/ner/feedback/stats", headers=bearer(ADMIN_KEY)).json()
        for bad, why in [([{"start": 0, "end": 5, "label": "ORG"}], "unknown type"),
                         ([{"start": 0, "end": 50, "label": "PER"}], "not a span of the text"),
                         ([{"start": 0, "end": 9, "label": "PER"}, {"start": 6, "end": 11, "label": "LOC"}], "overlap"),
                         ([{"start": 14, "end": 19, "label": "LOC"}], "begins or ends with whitespace; the entity is 15..19"),
                         ([{"start": 0, "end": 5, "label": "PER", "text": "Alan"}], "says 'Alan' but the text there is not that")]:
            refused = c.post("/v1/feedback", json={"prediction_id": answer["id"], "entities": bad},
                             headers=bearer(FEEDBACK_KEY))
            assert refused.status_code == 422 and why in refused.json()["error"]["message"], refused.text
            assert "Grace" not in refused.text  # the text of a prediction is never quoted back
        shape = c.post("/v1/feedback", json={"prediction_id": answer["id"], "label": "PER"},
                       headers=bearer(FEEDBACK_KEY))
        assert shape.status_code == 422 and "entities" in shape.json()["error"]["message"]
        after = c.get("/v1/models/ner/feedback/stats", headers=bearer(ADMIN_KEY)).json()
    assert after == before  # nothing of the refused ones was stored
    assert after["total"] == 2 and after["by_label"] == {"LOC": 1, "O": 1, "PER": 1}
    # Online quality per type: each corrected entity was either served (right) or missed.
    quality = after["by_version"]["v1"]["by_label"]
    assert all(quality[t]["right"] + quality[t]["missed"] == 1 for t in TYPES), quality


def test_a_second_job_learns_the_corrections_and_the_gate_compares_entity_f1(ner):
    from tuneloop.training.launcher import run_training

    _, cfg, _ = ner
    outcome = run_training(cfg, "ner", trigger="manual")
    assert outcome.job.state in ("succeeded", "rejected"), outcome.job.model_dump()
    manifest = outcome.manifest
    feedback = manifest.data["feedback"]
    assert manifest.parent == "v1" and feedback["fresh_rows"] + feedback["on_golden_texts"] == 2  # both corrections
    golden = next(c for c in manifest.gate.checks if c.name == "golden")
    assert {"f1", "production_f1"} <= set(golden.numbers), golden


def test_v1s_int8_artifact_is_smoothed_on_its_training_rows_and_checked_tag_by_tag(ner):
    from tuneloop.serving.optimize import optimize_version
    from tuneloop.store.registry import Registry
    from tuneloop.store.storage import Storage

    _, cfg, outcome = ner
    cfg = cfg.model_copy(update={"optimize": cfg.optimize.model_copy(update={"speed_seconds": 0.2})})
    registry = Registry(Storage(cfg.storage.root))
    optimization = optimize_version(cfg, registry, "ner", "v1").optimization
    trained_on = registry.table("ner", "v1", "trained_on")
    int8 = optimization.artifacts["onnx-int8"]
    assert int8.bytes > 0 and int8.settings["smoothing_alpha"] == 0.8 and int8.settings["smoothed_matmuls"] > 0
    assert int8.settings["calibration"] == "trained_on"  # the job published its rows: no golden text calibrates
    assert int8.settings["calibration_rows"] == min(256, trained_on.num_rows)
    fp32 = optimization.artifacts["onnx"].parity
    assert fp32.passed and fp32.agreement == 1.0 and fp32.rows > 0  # per golden sentence, its tags
    assert int8.parity.rows == fp32.rows

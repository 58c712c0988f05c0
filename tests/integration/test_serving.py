"""The Serve application over real HTTP: contract, bad inputs, feedback to Parquet, metrics,
and a version switch while clients keep sending requests."""

from __future__ import annotations

import threading
import time

import httpx
import pyarrow.dataset as pads
import pytest

from tuneloop.store.storage import Storage
from tests.integration.conftest import (
    ADMIN_KEY,
    FEEDBACK_KEY,
    METRICS_KEY,
    PREDICT_KEY,
    _FEEDBACK,
    bearer,
    make_config,
    publish_version,
    served,
)

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def app(ray_session, serve_port, metrics_dir, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-store")
    cfg = make_config(root, tiny_model, None, auth={"feedback_burst": 20, "feedback_per_minute": 60})
    publish_version(cfg, tiny_model)
    with served(cfg, metrics_dir, serve_port) as url:
        yield {"url": url, "cfg": cfg, "root": root, "weights": tiny_model}


def post(url: str, body, key: str | None = FEEDBACK_KEY, headers: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(url, json=body, timeout=30, headers={**(bearer(key) if key else {}), **(headers or {})}, **kw)


def test_health_ready_and_models(app):
    url = app["url"]
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == {"sentiment": "v1"}
    # A HEAD (load balancers, uptime checks) gets the status alone, wherever a GET is answered (RFC 9110).
    for probe in ("/healthz", "/readyz", "/v1/models", "/v1/models/sentiment", "/metrics"):
        head = httpx.head(f"{url}{probe}")
        assert head.status_code == 200 and head.content == b"", probe
    assert httpx.head(f"{url}/v1/models/nope").status_code == 404
    assert httpx.delete(f"{url}/v1/models").headers["allow"] == "GET, HEAD"
    schema = httpx.get(f"{url}/openapi.json").json()  # one operation a GET, each its own operationId
    operations = [op for path in schema["paths"].values() for op in path.values()]
    assert "head" not in {m for path in schema["paths"].values() for m in path}
    assert len({op["operationId"] for op in operations}) == len(operations)
    models = httpx.get(f"{url}/v1/models").json()["models"]
    assert models == [{"name": "sentiment", "task": "text-classification", "labels": ["negative", "positive"],
                       "production": "v1", "canary": None, "shadow": None, "rollout": None}]
    detail = httpx.get(f"{url}/v1/models/sentiment").json()
    assert [v["version"] for v in detail["versions"]] == ["v1"]
    assert "gate" not in detail["versions"][0] and "history" not in detail  # gate, metrics, history: admins'
    detail = httpx.get(f"{url}/v1/models/sentiment", headers=bearer(ADMIN_KEY)).json()
    assert {"gate", "metrics"} <= set(detail["versions"][0]) and detail["history"][-1]["event"] == "promote"
    assert httpx.get(f"{url}/openapi.json").json()["info"]["title"] == "tuneloop"  # the schema, open
    for page in ("/docs", "/redoc"):  # Swagger UI and ReDoc from a CDN: not served
        gone = httpx.get(f"{url}{page}")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


def test_predict_returns_id_version_and_scores(app):
    r = post(f"{app['url']}/v1/models/sentiment/predict", {"inputs": ["a fine day", "a bad day", "meh"]})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "sentiment" and len(body["predictions"]) == 3
    ids = set()
    for p in body["predictions"]:
        assert p["version"] == "v1" and p["label"] in ("negative", "positive")
        assert set(p["scores"]) == {"negative", "positive"}
        assert abs(sum(p["scores"].values()) - 1) < 1e-4 and p["score"] == max(p["scores"].values())
        ids.add(p["id"])
    assert len(ids) == 3


@pytest.mark.parametrize(
    "path, body, status, code",
    [
        ("/v1/models/sentiment/predict", b'{"inputs": ["x"', 400, "malformed_json"),
        ("/v1/models/sentiment/predict", {"inputs": []}, 422, "invalid_value"),
        ("/v1/models/sentiment/predict", {"inputs": ["ok", 3]}, 422, "invalid_request"),
        ("/v1/models/sentiment/predict", {"inputs": "not a list"}, 422, "invalid_request"),
        ("/v1/models/sentiment/predict", {}, 422, "invalid_request"),
        ("/v1/models/sentiment/predict", [1, 2], 422, "invalid_request"),
        ("/v1/models/sentiment/predict", {"inputs": ["x"], "extra": 1}, 422, "invalid_request"),
        ("/v1/models/sentiment/predict", {"inputs": ["x"] * 9}, 413, "payload_too_large"),
        ("/v1/models/sentiment/predict", {"inputs": ["x" * 201]}, 413, "payload_too_large"),
        ("/v1/models/unknown/predict", {"inputs": ["x"]}, 404, "unknown_model"),
        ("/v1/models/unknown/predict", {}, 404, "unknown_model"),  # not 422: the body is no matter
        ("/v1/models/unknown/predict", {"inputs": "x"}, 404, "unknown_model"),
        ("/v1/models/unknown/predict", b'{"inputs": ["x"', 404, "unknown_model"),  # not 400: no such model
        ("/v1/feedback", {"model": "sentiment", "text": "x", "label": "neutral"}, 422, "invalid_label"),
        ("/v1/feedback", {"model": "unknown", "text": "x", "label": "positive"}, 404, "unknown_model"),
        ("/v1/feedback", {"prediction_id": "0" * 32, "label": "positive"}, 404, "unknown_prediction"),
        ("/v1/feedback", {"prediction_id": "nope", "label": "positive"}, 404, "unknown_prediction"),
        ("/v1/feedback", {"label": "positive"}, 422, "invalid_request"),
        ("/v1/feedback", {"prediction_id": "p", "model": "sentiment", "text": "x", "label": "positive"}, 422,
         "invalid_request"),
        ("/v1/feedback", {"model": "sentiment", "text": "x" * 201, "label": "positive"}, 413, "payload_too_large"),
    ],
)
def test_bad_requests_get_json_4xx(app, path, body, status, code):
    if isinstance(body, bytes):
        r = httpx.post(app["url"] + path, content=body, headers={**JSON, **bearer(FEEDBACK_KEY)})
    else:
        r = post(app["url"] + path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_a_feedback_body_of_neither_form_is_told_so_in_its_own_words(app):
    """The message began 'body: Value error, ', pydantic's words, not the API's."""
    r = post(app["url"] + "/v1/feedback", {"label": "positive"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith('give either "prediction_id"'), r.text
    r = post(app["url"] + "/v1/feedback", {"model": "sentiment", "text": "x", "label": None})
    assert r.status_code == 422 and '"label" must be a string, not null' in r.json()["error"]["message"], r.text


def test_transport_level_rejections(app):
    url = f"{app['url']}/v1/models/sentiment/predict"
    r = httpx.post(url, content=b"inputs=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    huge = b'{"inputs": ["' + b"x" * 2_000_000 + b'"]}'
    r = httpx.post(url, content=huge, headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert httpx.get(f"{app['url']}/no/such/path").json()["error"]["code"] == "not_found"
    # A trailing slash is the bare path, on the ingress's routes as on predict (no empty 307).
    for method, path, status in [("GET", "/v1/models", 200), ("POST", "/v1/feedback", 422),
                                 ("POST", "/v1/models/sentiment/predict", 422)]:
        bare, slash = (httpx.request(method, f"{app['url']}{p}", json={}, headers=bearer(ADMIN_KEY))
                       for p in (path, path + "/"))
        assert bare.status_code == slash.status_code == status and bare.json() == slash.json(), (path, slash.text)
    assert httpx.get(f"{app['url']}/v1/jobs/unknown", headers=bearer(ADMIN_KEY)).status_code == 404
    assert httpx.get(f"{app['url']}/v1/jobs/unknown").status_code == 401  # job records are for admins


def _feedback_rows(root, wait_s: float = 10.0) -> list[dict]:
    """The Parquet rows, once the journal has been compacted (every 0.5 s here)."""
    journal = root / "journal" / "feedback"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(p.stat().st_size for p in journal.glob("*.wal")):
        time.sleep(0.1)
    path = root / "feedback" / "sentiment"
    if not path.exists():
        return []
    return pads.dataset(str(path), format="parquet", partitioning="hive").to_table().to_pylist()


def test_feedback_is_durable_parquet_joined_to_the_prediction(app):
    url, root = app["url"], app["root"]
    before = len(_feedback_rows(root))
    pred = post(f"{url}/v1/models/sentiment/predict", {"inputs": ["the soup was cold"]}).json()["predictions"][0]
    r = post(f"{url}/v1/feedback", {"prediction_id": pred["id"], "label": "negative"})
    assert r.status_code == 202
    fid = r.json()["feedback_id"]
    r2 = post(f"{url}/v1/feedback", {"model": "sentiment", "text": "loved it", "label": "positive"})
    assert r2.status_code == 202
    rows = {row["feedback_id"]: row for row in _feedback_rows(root)}  # compacted to Parquet
    assert len(rows) == before + 2
    joined = rows[fid]
    assert joined["text"] == "the soup was cold" and joined["prediction_id"] == pred["id"]
    assert joined["version"] == "v1" and joined["predicted_label"] == pred["label"]
    assert joined["label"] == "negative" and joined["predicted_at"] is not None
    assert joined["key_id"] == _FEEDBACK.id  # which key sent it: its id, never the key
    by_text = rows[r2.json()["feedback_id"]]
    assert by_text["text"] == "loved it" and by_text["prediction_id"] is None and by_text["version"] is None
    # A rejected request (a label the model does not have) stores nothing.
    refused = post(f"{url}/v1/feedback", {"prediction_id": pred["id"], "label": "neutral"})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_label", refused.text
    assert len(_feedback_rows(root)) == before + 2


def _sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` with ``labels`` in a /metrics text (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_metrics_endpoint(app):
    """Counted by this request: every test module serves model sentiment v1 into the session's
    one metrics folder, so series that merely exist were written by earlier modules."""
    v1 = {"model": "sentiment", "version": "v1"}
    counted = [("tuneloop_requests_total", {**v1, "outcome": "ok"}), ("tuneloop_request_latency_seconds_count", v1),
               ("tuneloop_batch_size_count", v1), ("tuneloop_model_compute_seconds_count", v1),
               ("tuneloop_batch_tokens_count", {**v1, "kind": "real"}),
               ("tuneloop_batch_tokens_count", {**v1, "kind": "padded"}),
               ("tuneloop_queue_wait_seconds_count", {"model": "sentiment"}), ("tuneloop_feedback_total", {"model": "sentiment"})]
    before = httpx.get(f"{app['url']}/metrics").text
    post(f"{app['url']}/v1/models/sentiment/predict", {"inputs": ["count me"]})
    assert post(f"{app['url']}/v1/feedback", {"model": "sentiment", "text": "count me", "label": "positive"}).status_code == 202
    text = httpx.get(f"{app['url']}/metrics").text
    for name, labels in counted:
        assert _sample(text, name, **labels) == _sample(before, name, **labels) + 1, (name, labels)
    assert 'tuneloop_replicas{model="sentiment"} 1.0' in text


def test_version_switch_under_load_drops_nothing(app):
    """Publish and promote v2 while 4 clients keep predicting: every request succeeds, and
    the replicas move to v2 without a restart."""
    url, cfg = app["url"], app["cfg"]
    stop = threading.Event()
    seen: list[tuple[float, str]] = []
    failures: list[str] = []

    def client():
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post(f"{url}/v1/models/sentiment/predict", json={"inputs": ["steady traffic", "more"]})
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                    continue
                for p in r.json()["predictions"]:
                    seen.append((time.monotonic(), p["version"]))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    current = httpx.get(f"{url}/readyz").json()["models"]["sentiment"]
    new_version = publish_version(cfg, app["weights"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(v == new_version for _, v in seen):
        time.sleep(0.2)
    switched_at = next((t for t, v in seen if v == new_version), None)
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert switched_at is not None, "replicas never served the new version"
    assert {v for _, v in seen} == {current, new_version}
    # Once the new batch ran, only requests already in flight may still carry the old version.
    late_old = [t for t, v in seen if v == current and t > switched_at + 1.0]
    assert not late_old
    assert httpx.get(f"{url}/readyz").json()["models"]["sentiment"] == new_version
    # Without a restart: each replica notes a switch under its own id (a fresh one per replica
    # object), and the ones that moved to the new version are the ones that served the old.
    storage = Storage(cfg.storage.root)

    def replicas(version: str) -> set[str]:
        return {i.base_name.removesuffix(".json") for i in storage.list_dir(f"registry/sentiment/switches/{version}")}

    assert replicas(new_version) and replicas(new_version) <= replicas(current)


def test_keys_and_roles_are_enforced(app):
    url = app["url"]
    body = {"model": "sentiment", "text": "who may say this", "label": "positive"}
    r = post(f"{url}/v1/feedback", body, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert post(f"{url}/v1/feedback", body, key="tl_00000000_" + "0" * 32).status_code == 401
    r = post(f"{url}/v1/feedback", body, key=PREDICT_KEY)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert post(f"{url}/v1/feedback", body, key=ADMIN_KEY).status_code == 202  # admin ranks above
    # Predict is open by default, and a bad key is still refused.
    assert post(f"{url}/v1/models/sentiment/predict", {"inputs": ["x"]}, key=None).status_code == 200
    assert post(f"{url}/v1/models/sentiment/predict", {"inputs": ["x"]}, key="tl_bad").status_code == 401
    for path in ("retrain", "rollback"):
        assert post(f"{url}/v1/models/sentiment/{path}", {}, key=FEEDBACK_KEY).status_code == 403
    assert post(f"{url}/v1/models/sentiment/promote", {"version": "v1"}, key=None).status_code == 401
    assert httpx.get(f"{url}/v1/models/sentiment/feedback/stats").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers=bearer("tl_bad")).status_code == 401  # as predict: a key is checked


def test_promote_and_rollback_by_an_admin(app):
    url, cfg = app["url"], app["cfg"]
    before = httpx.get(f"{url}/readyz").json()["models"]["sentiment"]
    new = publish_version(cfg, app["weights"], promote=False)
    for loose in ("yes", 1):  # pydantic's lax mode read both as true: a rejected version promoted
        r = post(f"{url}/v1/models/sentiment/promote", {"version": new, "force": loose}, key=ADMIN_KEY)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = post(f"{url}/v1/models/sentiment/promote", {"version": new}, key=ADMIN_KEY)
    assert r.status_code == 200 and r.json()["production"] == new
    assert r.json()["history"][-1]["reason"].startswith("by key ")
    for _ in range(2):  # retried after a timeout: production steps back once
        r = post(f"{url}/v1/models/sentiment/rollback", {}, key=ADMIN_KEY, headers={"Idempotency-Key": "rb-1"})
        assert r.status_code == 200 and r.json()["production"] == before
    r = post(f"{url}/v1/models/sentiment/promote", {"version": new}, key=ADMIN_KEY, headers={"Idempotency-Key": "pr-1"})
    assert r.status_code == 200 and r.json()["production"] == new
    # The same key for another version: refused, not answered with the first one's outcome.
    r = post(f"{url}/v1/models/sentiment/promote", {"version": before}, key=ADMIN_KEY,
             headers={"Idempotency-Key": "pr-1"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_value" and "pr-1" in r.json()["error"]["message"]
    r = post(f"{url}/v1/models/sentiment/promote", {"version": "v999"}, key=ADMIN_KEY)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_version"
    r = post(f"{url}/v1/models/sentiment/retrain", {}, key=ADMIN_KEY)
    assert r.status_code == 503  # this app runs without the retrain controller


def test_an_admin_lists_and_releases_quarantined_keys(app):
    from tuneloop.store.quarantine import QuarantineBook
    from tuneloop.store.storage import Storage

    url, cfg = app["url"], app["cfg"]
    QuarantineBook(Storage(cfg.storage.root)).quarantine("sentiment", {"bbbbbbbb": "far off"}, {"bbbbbbbb": {"rows": 40}})
    assert httpx.get(f"{url}/v1/models/sentiment/feedback/keys", headers=bearer(FEEDBACK_KEY)).status_code == 403
    listed = httpx.get(f"{url}/v1/models/sentiment/feedback/keys", headers=bearer(ADMIN_KEY)).json()
    assert [(k["key_id"], k["state"], k["reason"]) for k in listed["keys"]] == [("bbbbbbbb", "quarantined", "far off")]
    r = post(f"{url}/v1/models/sentiment/feedback/keys/bbbbbbbb/release", {}, key=ADMIN_KEY)
    assert r.status_code == 200 and r.json()["state"] == "released"
    again = post(f"{url}/v1/models/sentiment/feedback/keys/bbbbbbbb/release", {}, key=ADMIN_KEY)
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_quarantined"
    assert httpx.get(f"{url}/v1/models/nope/feedback/keys", headers=bearer(ADMIN_KEY)).status_code == 404


def test_second_feedback_on_a_prediction_wins_and_stats_count_it(app):
    url = app["url"]
    pred = post(f"{url}/v1/models/sentiment/predict", {"inputs": ["changed my mind"]}).json()["predictions"][0]
    wrong = "negative" if pred["label"] == "positive" else "positive"
    assert post(f"{url}/v1/feedback", {"prediction_id": pred["id"], "label": wrong}).status_code == 202
    assert post(f"{url}/v1/feedback", {"prediction_id": pred["id"], "label": pred["label"]}).status_code == 202
    stats = httpx.get(f"{url}/v1/models/sentiment/feedback/stats", headers=bearer(FEEDBACK_KEY)).json()
    assert stats["superseded"] >= 1 and stats["total"] >= 1
    version = stats["by_version"][pred["version"]]
    assert 0 <= version["online_accuracy"] <= 1 and version["agreed"] >= 1
    assert sum(stats["by_label"].values()) == stats["total"] == sum(stats["by_day"].values())
    series = f'tuneloop_feedback_online_accuracy{{model="sentiment",version="{pred["version"]}"}}'
    assert series in httpx.get(f"{url}/metrics", headers=bearer(FEEDBACK_KEY)).text
    assert series in httpx.get(f"{url}/metrics", headers=bearer(METRICS_KEY)).text  # Prometheus' scrape key...
    refused = post(f"{url}/v1/feedback", {"prediction_id": pred["id"], "label": wrong}, key=METRICS_KEY)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"  # ...sends no feedback
    assert httpx.get(f"{url}/v1/models/sentiment/feedback/stats", headers=bearer(METRICS_KEY)).status_code == 403
    open_metrics = httpx.get(f"{url}/metrics").text  # no key: operational series only
    assert "tuneloop_feedback_online_accuracy" not in open_metrics and "tuneloop_requests_total" in open_metrics
    assert httpx.get(f"{url}/metrics", headers=bearer("tl_00000000_" + "0" * 32)).status_code == 401


def test_feedback_rate_limit_per_key(app):
    url = app["url"]
    from tuneloop.store.keys import add_stored_key
    from tuneloop.store.storage import Storage

    flood_key = add_stored_key(Storage(app["cfg"].storage.root), "feedback")  # picked up within seconds
    deadline = time.monotonic() + 30  # the key refresher's next read (every 5 s, on its own thread)
    while httpx.get(f"{url}/v1/models/sentiment/feedback/stats", headers=bearer(flood_key)).status_code != 200:
        assert time.monotonic() < deadline, "the new key was not picked up within 30 s"
        time.sleep(0.2)
    body = {"model": "sentiment", "text": "again and again", "label": "positive"}
    answers = [post(f"{url}/v1/feedback", body, key=flood_key) for _ in range(30)]
    codes = [r.status_code for r in answers]
    assert codes[:15] == [202] * 15 and 429 in codes, codes
    # The refused answer itself, not one more request: the bucket refills 2 tokens a second,
    # and a request sent after the flood could find one (a fresh-clone run did).
    limited = answers[codes.index(429)]
    assert int(limited.headers["retry-after"]) >= 1 and limited.json()["error"]["code"], limited.text
    assert post(f"{url}/v1/feedback", body, key=FEEDBACK_KEY).status_code == 202  # others unaffected

"""The predict body checks the model replica makes without FastAPI: same codes as the ingress."""

from __future__ import annotations

import json
import re

import pytest

from tuneloop.core.config import ServingConfig
from tuneloop.core.errors import InvalidRequest, TuneloopError
from tuneloop.core.tasks import make_task
from tuneloop.serving.responses import error_response
from tuneloop.serving.predict_request import (
    PredictLimits,
    check_content_length,
    check_content_type,
    parse_predict_body,
)

LIMITS = PredictLimits(max_inputs=3, max_chars=10, max_body_bytes=200)
TASK = make_task("text-classification", ["negative", "positive"])


def _code(fn, *args) -> tuple[int, str]:
    with pytest.raises(TuneloopError) as info:
        fn(*args)
    return info.value.status, info.value.code


def test_a_good_body_gives_its_texts():
    assert parse_predict_body(b'{"inputs": ["a", "b"]}', LIMITS, TASK) == ["a", "b"]


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b'{"inputs": ["x"', 400, "malformed_json"),
        (b"\xff\xfe", 400, "malformed_json"),
        (b"[1, 2]", 422, "invalid_request"),
        (b"{}", 422, "invalid_request"),
        (b'{"inputs": "x"}', 422, "invalid_request"),
        (b'{"inputs": ["x", 3]}', 422, "invalid_request"),
        (b'{"inputs": [null]}', 422, "invalid_request"),
        (b'{"inputs": ["x"], "extra": 1}', 422, "invalid_request"),
        (b'{"inputs": []}', 422, "invalid_value"),
        (b'{"inputs": ["a", "b", "c", "d"]}', 413, "payload_too_large"),
        (b'{"inputs": ["' + b"x" * 11 + b'"]}', 413, "payload_too_large"),
        (b'{"inputs": ["' + b"x" * 300 + b'"]}', 413, "payload_too_large"),
    ],
)
def test_bad_bodies_get_the_contract_codes(body, status, code):
    assert _code(parse_predict_body, body, LIMITS, TASK) == (status, code)


def test_errors_quote_what_was_wrong():
    with pytest.raises(TuneloopError) as info:
        parse_predict_body(json.dumps({"inputs": ["ok", 7]}).encode(), LIMITS, TASK)
    assert "inputs[1]" in info.value.message and "not a number" in info.value.message
    answer = error_response(info.value)
    assert answer.status_code == 422
    assert json.loads(answer.body) == {"error": {"code": "invalid_request", "message": info.value.message}}


def test_headers_are_checked_before_the_body_is_read():
    check_content_type(None)  # JSON is assumed
    check_content_type("application/json; charset=utf-8")
    check_content_type("application/problem+json")
    assert _code(check_content_type, "text/plain") == (415, "unsupported_media_type")
    assert _code(check_content_type, "text/x+json") == (415, "unsupported_media_type")  # FastAPI parses it not
    check_content_type("")  # an empty header: read as JSON, as FastAPI reads it
    check_content_type("Application/JSON")
    for odd in ("application/a/b+json", "application//+json", "application/jsonx", "\x00"):  # no JSON type to FastAPI
        assert _code(check_content_type, odd) == (415, "unsupported_media_type"), odd
    check_content_length(None, 10)
    check_content_length("10", 10)
    assert _code(check_content_length, "11", 10) == (413, "payload_too_large")
    assert _code(check_content_length, "-1", 10) == (400, "invalid_request")


def test_body_limit_allows_the_largest_legal_request():
    s = ServingConfig(max_inputs_per_request=4, max_chars_per_input=50)
    limits = PredictLimits.from_config(s)
    body = json.dumps({"inputs": ["\u00e9" * 50] * 4}).encode()  # every character escaped
    assert len(body) <= s.max_body_bytes()
    assert len(parse_predict_body(body, limits, TASK)) == 4
    emoji = json.dumps({"inputs": ["\U0001f600" * 50] * 4}).encode()  # each a pair of escapes, 12 bytes
    assert len(emoji) <= s.max_body_bytes() and len(parse_predict_body(emoji, limits, TASK)) == 4


def test_feedback_body_limit_allows_a_text_with_an_entity_a_character():
    """One input a request: the predict limit (24 KB at 2,000 characters) refused an NER
    correction of a long text with many entities."""
    s = ServingConfig(max_inputs_per_request=1, max_chars_per_input=2000)
    entities = [{"start": 9_999_999, "end": 9_999_999, "label": "ORGANISATION_NAME"}] * 2000
    body = json.dumps({"prediction_id": "f" * 32, "text": "\u00e9" * 2000, "entities": entities}).encode()
    assert s.max_body_bytes() < len(body) <= s.max_feedback_body_bytes()  # every character escaped, too


def test_valid_json_python_cannot_convert_is_a_422_not_malformed():
    from tuneloop.serving.predict_request import load_json

    assert _code(load_json, b'{"n": ' + b"9" * 5000 + b"}") == (422, "invalid_request")  # int()'s digit limit
    assert _code(load_json, b'{"n": 9') == (400, "malformed_json")


def test_an_error_quoting_a_lone_surrogate_is_still_json():
    from tuneloop.core.errors import Conflict

    answer = error_response(Conflict("version '\ud800' is not the one rolled out"))
    assert answer.status_code == 409 and "\\ud800" in json.loads(answer.body)["error"]["message"]


@pytest.mark.parametrize("header", ["²", "1" * 20, "-1", "1e3"])
def test_a_content_length_int_cannot_read_is_a_400_not_a_500(header):
    """"²" passed str.isdigit and then failed int(): a ValueError, a 500."""
    with pytest.raises(InvalidRequest):
        check_content_length(header, 1000)


def test_an_error_quoting_a_huge_value_is_cut():
    from tuneloop.core.errors import InvalidLabel

    body = json.loads(error_response(InvalidLabel("m", "x" * 1_000_000, ["a", "b"])).body)
    assert len(body["error"]["message"]) < 2100 and "(1000000 characters)" in body["error"]["message"]


def test_a_replicas_request_bytes_are_bounded_together_and_given_back_on_every_outcome():
    """One body's limit times the requests Serve lets a replica take let 114 MiB bodies add
    up to 132 GiB: bytes are taken from the replica's budget as they arrive."""
    import asyncio

    from tuneloop.core.errors import Overloaded, PayloadTooLarge, RequestTimeout
    from tuneloop.serving.predict_request import BodyBudget, read_body

    async def chunks(*parts: bytes, stall_s: float = 0.0):
        for part in parts:
            yield part
        await asyncio.sleep(stall_s)

    budget = BodyBudget(10)
    first = asyncio.run(read_body(chunks(b"1234", b"5678"), limit=100, timeout_s=5, budget=budget))
    assert first == b"12345678" and budget.held == 8  # held until its request is answered
    with pytest.raises(Overloaded, match=r"holds 10 bytes of requests, its limit 10 \(serving.max_body_bytes_in_flight\)") as e:
        asyncio.run(read_body(chunks(b"ab", b"cde"), limit=100, timeout_s=5, budget=budget))
    assert e.value.status == 503 and budget.held == 8  # the refused body's own bytes went back
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(chunks(b"ab", b"c"), limit=2, timeout_s=5, budget=budget))
    with pytest.raises(RequestTimeout):
        asyncio.run(read_body(chunks(b"a", stall_s=1.0), limit=100, timeout_s=0.05, budget=budget))
    assert budget.held == 8
    budget.give(len(first))
    assert budget.held == 0 and asyncio.run(read_body(chunks(b"0123456789"), 100, 5, budget)) == b"0123456789"
    ingress = BodyBudget(1, "the ingress's")  # the key above does not size it: the 503 says what does
    with pytest.raises(Overloaded, match=r"its limit 1 \(the ingress's\)"):
        asyncio.run(read_body(chunks(b"ab"), 100, 5, ingress))


def test_the_bytes_in_flight_must_hold_one_whole_body():
    from tuneloop.core.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="max_body_bytes_in_flight 1000 is below one request body's largest"):
        parse_config({"models": [{"name": "m", "labels": ["a", "b"]}], "serving": {"max_body_bytes_in_flight": 1000}})


def test_the_ingress_bounds_the_bodies_it_holds_before_any_key_is_checked(monkeypatch):
    """256 slow senders of predict-sized bodies, keyless, held 376 MiB at the ingress."""
    import asyncio

    from tuneloop.serving.body_guard import BodyGuard
    from tuneloop.serving.predict_request import BodyBudget

    monkeypatch.setattr(BodyGuard, "budget", BodyBudget(10))
    monkeypatch.setattr(BodyGuard, "max_body_bytes", 100)
    seen = []

    async def app(scope, receive, send):
        seen.append(BodyGuard.budget.held)  # held while the route answers
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    def call(body: bytes) -> int:
        sent = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/feedback",
                 "headers": [(b"content-type", b"application/json")]}
        asyncio.run(BodyGuard(app)(scope, receive, send))
        return sent[0]["status"]

    assert call(b'{"a": 12}') == 202 and seen == [9] and BodyGuard.budget.held == 0
    assert call(b'{"a": 1234}') == 503 and BodyGuard.budget.held == 0  # 11 bytes: past the budget
    assert call(b'{"a": ') == 400 and BodyGuard.budget.held == 0  # not JSON: given back too


def test_a_path_naming_a_model_the_config_lacks_is_found_whatever_else_it_holds():
    """Malformed JSON or another media type on /v1/models/nosuch/predict answered 400 or 415,
    where every other refusal there is 404 unknown_model."""
    from tuneloop.serving.body_guard import unknown_model

    models = frozenset({"sentiment"})
    assert unknown_model("/v1/models/nosuch/predict", models) == "nosuch"
    assert unknown_model("/v1/models/nosuch/", models) == "nosuch"
    assert unknown_model("/v1/models/sentiment/predict", models) is None
    assert unknown_model("/v1/models", models) is None and unknown_model("/v1/feedback", models) is None
    assert unknown_model("/v1/models/nosuch/predict", None) is None  # before the ingress set them
    assert unknown_model("/v1/models//predict", models) is None  # no model named: no route


def test_errors_name_a_clients_value_cut_short():
    """A feedback on a 100,000-character prediction id got a 404 repeating the whole id."""
    from tuneloop.core.errors import UnknownPrediction, UnknownVersion

    assert len(UnknownPrediction("0" * 100_000).message) < 150
    assert UnknownPrediction("0" * 100_000).message.endswith("... (100000 characters)")
    assert UnknownPrediction("abc").message == "no prediction with id 'abc'"
    assert "did you mean" not in UnknownVersion("m", "1" * 50).message
    with pytest.raises(TuneloopError) as info:
        parse_predict_body(json.dumps({"inputs": ["ok"], **{f"k{i}": 1 for i in range(9)}}).encode(), LIMITS, TASK)
    assert "and 4 more" in info.value.message and "k8" not in info.value.message


def test_a_number_too_long_for_python_is_a_422_in_our_words():
    """Python's message advised the client to call sys.set_int_max_str_digits()."""
    from tuneloop.core.errors import InvalidBody
    from tuneloop.serving.predict_request import load_json

    with pytest.raises(InvalidBody, match=r"a number too long to read \(more than 4,300 digits\)$"):
        load_json(b'{"inputs": ["x"], "n": ' + b"1" * 5000 + b"}")


@pytest.mark.parametrize("body, says", [
    (b"null", "must be a JSON object {\"inputs\": [...]}, not null"),
    (b'{"inputs": {"a": 1}}', '"inputs" must be a list of texts, not an object'),
    (b'{"inputs": [null]}', "inputs[0] must be a string, not null"),
    (b'{"inputs": [true]}', "inputs[0] must be a string, not a boolean"),
])
def test_a_wrong_type_is_named_in_jsons_words_not_pythons(body, says):
    """A null came back as "not NoneType"."""
    from tuneloop.core.errors import InvalidBody
    from tuneloop.core.tasks import model_task
    from tuneloop.core.config import ModelConfig
    from tuneloop.serving.predict_request import PredictLimits, parse_predict_body

    task = model_task(ModelConfig(name="m", labels=["a", "b"]))
    with pytest.raises(InvalidBody, match=re.escape(says)):
        parse_predict_body(body, PredictLimits(max_inputs=8, max_chars=100, max_body_bytes=1000), task)


def test_a_trailing_slash_is_the_bare_path_as_sent_and_as_decoded():
    """Predict's ingress route compares ``raw_path`` with its route: a slash left there
    answered 404 "percent-encoded" where the bare path answered 503 not_ready."""
    import asyncio

    from tuneloop.serving.body_guard import TrailingSlash

    seen = []

    async def app(scope, receive, send):
        seen.append((scope["path"], scope.get("raw_path")))

    for path, raw in [("/v1/models/m/predict/", b"/v1/models/m/predict/"), ("/healthz//", b"/healthz//"),
                      ("/", b"/"), ("/v1/feedback", b"/v1/feedback")]:
        asyncio.run(TrailingSlash(app)({"type": "http", "path": path, "raw_path": raw}, None, None))
    assert seen == [("/v1/models/m/predict", b"/v1/models/m/predict"), ("/healthz", b"/healthz"), ("/", b"/"),
                    ("/v1/feedback", b"/v1/feedback")]


def test_the_ingress_routes_before_it_reads_a_body_and_refuses_compressed_ones(monkeypatch):
    """Read first, a PUT of text to /healthz answered 415 and a POST to a path no route has
    400 or 415, where the route's 405 or 404 was due; a gzipped JSON body answered 400 "not
    valid JSON", and another encoding's bytes were parsed raw."""
    import gzip

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tuneloop.serving.body_guard import BodyGuard

    app = FastAPI()

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/v1/feedback", status_code=202)
    def feedback(body: dict):
        return body

    app.add_middleware(BodyGuard)
    client = TestClient(app)
    text = {"Content-Type": "text/plain"}
    assert client.put("/healthz", content=b"x", headers=text).status_code == 405
    assert client.put("/v1/feedback", content=b"not json", headers={"Content-Type": "application/json"}).status_code == 405
    assert client.post("/nosuch", content=b"x", headers=text).status_code == 404
    zipped = client.post("/v1/feedback", content=gzip.compress(b'{"a": 1}'),
                         headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert zipped.status_code == 415 and "Content-Encoding 'gzip' is not taken" in zipped.json()["error"]["message"]
    assert client.post("/v1/feedback", content=b"{", headers={"Content-Type": "application/json"}).status_code == 400
    assert client.post("/v1/feedback", json={"a": 1}, headers={"Content-Encoding": "identity"}).status_code == 202
    assert client.post("/v1/feedback", content=b"x" * 10, headers=text).status_code == 415  # routed: read as before

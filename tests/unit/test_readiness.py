"""/readyz names the versions replicas would not load, and why: before, only a predict's 503
and the replica's log said that a new production was refused (labels other than the config's)."""

from __future__ import annotations

import json

from tuneloop.serving.ingress import readiness


def _body(response) -> dict:
    return json.loads(response.body)


def test_a_model_with_nothing_loaded_is_503_saying_why():
    response = readiness({"a": (None, {"v3": "version v3's checkpoint has labels ['x', 'y']"}), "b": ("v1", {})})
    assert response.status_code == 503
    message = _body(response)["error"]["message"]
    assert message.startswith("no production version loaded for ['a'] (a v3: version v3's checkpoint has labels")


def test_ready_while_the_old_version_serves_still_names_the_refused_one():
    response = readiness({"a": ("v2", {"v3": "labels differ"}), "b": ("v1", {})})
    assert response.status_code == 200
    assert _body(response) == {"status": "ready", "models": {"a": "v2", "b": "v1"},
                               "not_loaded": {"a": {"v3": "labels differ"}}}
    assert _body(readiness({"a": ("v2", {})})) == {"status": "ready", "models": {"a": "v2"}}
    assert _body(readiness({"a": (None, {})}))["error"]["message"] == "no production version loaded for ['a']"

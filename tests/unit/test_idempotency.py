"""The Idempotency-Key index: a retry answers the first record, a key reused for another
request is refused, and clients without an API key never see each other's keys."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tuneloop.core.errors import InvalidValue
from tuneloop.core.idempotency import IdempotencyIndex, fingerprint

AT = datetime(2026, 12, 1, tzinfo=UTC)
ONE, OTHER = fingerprint({"model": "m", "text": "a", "label": "x"}), fingerprint({"model": "m", "text": "b", "label": "y"})


def test_a_key_with_an_api_key_answers_its_retry_and_refuses_another_request():
    index = IdempotencyIndex()
    index.remember("0a1b2c3d", "k", ONE, "f1", AT)
    assert index.answer("0a1b2c3d", "k", ONE) == "f1"
    with pytest.raises(InvalidValue, match="used for a different request"):
        index.answer("0a1b2c3d", "k", OTHER)
    assert index.answer("ffffffff", "k", OTHER) is None  # another API key's scope


def test_clients_without_an_api_key_are_scoped_by_their_request():
    index = IdempotencyIndex()
    index.remember(None, "1", ONE, "f1", AT)
    assert index.answer(None, "1", ONE) == "f1"  # a retry (or the same request again: stored once)
    assert index.answer(None, "1", OTHER) is None  # another client's key "1": neither refused nor answered
    index.remember(None, "1", OTHER, "f2", AT)
    assert index.answer(None, "1", OTHER) == "f2" and index.answer(None, "1", ONE) == "f1"

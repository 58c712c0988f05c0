"""The Idempotency-Key index: a retry answers the first record, a key reused for another
request is refused, and clients without an API key never see each other's keys."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tuneloop.core.errors import InvalidRequest, InvalidValue
from tuneloop.core.idempotency import IdempotencyIndex, fingerprint, parse_key

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


def test_the_key_is_read_from_one_header_quoted_or_bare():
    assert parse_key([]) is None
    assert parse_key(['"abc"']) == parse_key(["abc"]) == parse_key([" abc "]) == "abc"
    for bad in (["a b"], [""], ['""'], ["x" * 256], ["é"]):
        with pytest.raises(InvalidRequest, match="visible ASCII"):
            parse_key(bad)
    with pytest.raises(InvalidRequest, match="one Idempotency-Key header, not 2"):
        parse_key(["a", "a"])  # alike too: the contract is one header

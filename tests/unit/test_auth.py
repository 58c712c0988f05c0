"""Keys, roles and the feedback rate limit, as pure functions."""

import json
import logging
import multiprocessing
import os

import pytest

from tuneloop.core.auth import (
    KEYS_ENV,
    Authorizer,
    KeyFileError,
    RateLimiter,
    RevokeError,
    grants,
    keys_from_doc,
    keys_from_env,
    new_key,
    stored_keys_doc,
    without_key,
)
from tuneloop.store.keys import (
    KeyRing,
    add_stored_key,
    ensure_admin_key,
    read_key_file,
    revoke_stored_key,
    save_admin_key,
)
from tuneloop.core.config import ApiKeyConfig, AuthConfig
from tuneloop.core.errors import Forbidden, KeyStoreUnavailable, RateLimited, TuneloopError, Unauthorized
from tuneloop.store.storage import Storage


def test_keys_are_stored_hashed_and_checked_by_role():
    admin, admin_rec = new_key("admin")
    fb, fb_rec = new_key("feedback")
    pr, pr_rec = new_key("predict")
    doc = stored_keys_doc([admin_rec, fb_rec, pr_rec])
    assert admin not in str(doc) and admin.split("_")[2] not in str(doc)  # never the secret
    auth = Authorizer(keys_from_doc(doc))
    assert auth.check(f"Bearer {admin}", "admin") == admin_rec.id
    assert auth.check(f"Bearer {admin}", "feedback") == admin_rec.id  # admin ranks above
    assert auth.check(f"bearer {fb}", "feedback") == fb_rec.id
    assert auth.check(f"Bearer {pr}", "predict") == pr_rec.id
    with pytest.raises(Forbidden):
        auth.check(f"Bearer {pr}", "feedback")
    with pytest.raises(Forbidden):
        auth.check(f"Bearer {fb}", "admin")


def test_a_key_files_digest_in_upper_case_is_the_same_digest():
    """Hand-edited with a tool that prints hex in upper case (PowerShell's Get-FileHash), as
    the config's auth.keys takes it."""
    key, rec = new_key("feedback")
    doc = stored_keys_doc([rec])
    doc["keys"][0]["sha256"] = doc["keys"][0]["sha256"].upper()
    assert Authorizer(keys_from_doc(doc)).check(f"Bearer {key}", "feedback") == rec.id


def test_a_metrics_key_reads_the_feedback_series_and_nothing_else():
    """Prometheus' scrape key sits in a Secret or a file: leaked, it must not send feedback
    that trains the next version, nor read what the feedback says."""
    key, rec = new_key("metrics")
    auth = Authorizer([rec, *(new_key(r)[1] for r in ("feedback", "admin"))], open_roles=frozenset())
    assert auth.check(f"Bearer {key}", "metrics") == rec.id
    for role in ("predict", "feedback", "admin"):
        with pytest.raises(Forbidden, match="has role 'metrics'"):
            auth.check(f"Bearer {key}", role)
    assert Authorizer([rec], open_roles=frozenset({"predict"})).check(f"Bearer {key}", "predict") == rec.id  # open
    assert grants("feedback", "metrics") and grants("admin", "metrics") and not grants("predict", "metrics")
    assert keys_from_env(f"metrics:{key}") == [rec]
    assert AuthConfig(keys=[ApiKeyConfig(id=rec.id, role="metrics", sha256=rec.sha256)]).keys[0].role == "metrics"


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic abc", "Bearer tl_0000_x",
                                    "Bearer tl_deadbeef_" + "0" * 32])
def test_missing_or_bad_keys_are_401_where_a_key_is_needed(header):
    auth = Authorizer([new_key("admin")[1]])
    with pytest.raises(Unauthorized) as info:
        auth.check(header, "feedback")
    assert info.value.status == 401 and info.value.headers == {"WWW-Authenticate": "Bearer"}


def test_a_right_id_with_a_wrong_secret_is_refused():
    key, rec = new_key("admin")
    forged = key[:-1] + ("0" if key[-1] != "0" else "1")
    with pytest.raises(Unauthorized):
        Authorizer([rec]).check(f"Bearer {forged}", "predict")


def test_open_roles_need_no_key_but_a_given_key_is_still_checked():
    auth = Authorizer([new_key("predict")[1]], open_roles=frozenset({"predict", "feedback"}))
    assert auth.check(None, "predict") is None and auth.check(None, "feedback") is None
    with pytest.raises(Unauthorized):
        auth.check("Bearer nonsense", "feedback")
    with pytest.raises(Unauthorized):
        auth.check(None, "admin")


def test_an_open_role_opens_the_roles_below_it_and_none_above():
    feedback_open = Authorizer([], open_roles=frozenset({"feedback"}))
    assert feedback_open.check(None, "predict") is None and feedback_open.check(None, "feedback") is None
    with pytest.raises(Unauthorized):
        feedback_open.check(None, "admin")
    closed = Authorizer([], open_roles=frozenset())
    with pytest.raises(Unauthorized):
        closed.check(None, "predict")


def test_env_keys_parse_and_errors_never_echo_a_secret():
    key, rec = new_key("feedback")
    assert keys_from_env(f"feedback:{key}, ") == [rec]
    assert keys_from_env(None) == []
    with pytest.raises(ValueError) as info:
        keys_from_env(f"owner:{key}")
    assert key not in str(info.value) and "entry 1" in str(info.value)


def test_rate_limit_is_a_token_bucket_per_key():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.take("k1")
    with pytest.raises(RateLimited) as info:
        limiter.take("k1")
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "1"
    limiter.take("k2")  # another key has its own bucket
    now[0] += 1.0  # one token back per second at 60/min
    limiter.take("k1")
    with pytest.raises(RateLimited):
        limiter.take("k1")


def test_many_clients_keep_only_the_buckets_that_have_not_refilled():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=3, clock=lambda: now[0])
    for i in range(RateLimiter.MAX_BUCKETS - 1):
        limiter.take(f"anonymous 10.0.{i // 256}.{i % 256}")
    for _ in range(2):
        limiter.take("busy")
    limiter.take("late")  # one past the bound: the next take sweeps
    now[0] += 1.0  # the one-take buckets are full again; "busy" is one short
    limiter.take("one more")
    assert set(limiter._buckets) == {"busy", "one more"}
    with pytest.raises(RateLimited):  # forgetting never lets a client past its limit
        for _ in range(3):
            limiter.take("busy")
    for i in range(5 * RateLimiter.MAX_BUCKETS):  # clients all draining at once: still bounded
        limiter.take(f"anonymous fd00::{i:x}")
    assert len(limiter._buckets) <= RateLimiter.MAX_BUCKETS + 1

def test_first_run_creates_one_admin_key_stored_hashed(tmp_path, monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    storage, auth = Storage(str(tmp_path)), AuthConfig()
    key = ensure_admin_key(auth, storage)
    assert key is not None and key not in (tmp_path / "auth/keys.json").read_text()
    assert os.stat(tmp_path / "auth/keys.json").st_mode & 0o777 == 0o600
    assert ensure_admin_key(auth, storage) is None  # never a second one, never printed again
    ring = KeyRing(auth, storage, refresh_s=0)
    assert ring.check(f"Bearer {key}", "admin") == key.split("_")[1]
    env_key, _ = new_key("feedback")
    monkeypatch.setenv(KEYS_ENV, f"feedback:{env_key}")
    assert ring.check(f"Bearer {env_key}", "feedback")  # picked up without a restart
    assert ensure_admin_key(AuthConfig(create_admin_key=False), Storage(str(tmp_path / "other"))) is None


@pytest.fixture
def storage(tmp_path, monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    return Storage(str(tmp_path))


def test_without_key_drops_only_that_entry_and_keeps_the_rest_of_the_document():
    doc = {"keys": [{"id": "aaaaaaaa", "role": "admin", "sha256": "0" * 64, "created_at": "t1"},
                    {"id": "bbbbbbbb", "role": "feedback", "sha256": "1" * 64, "created_at": "t2"}], "note": "x"}
    kept, removed = without_key(doc, "aaaaaaaa")
    assert removed == doc["keys"][0]
    assert kept == {"keys": [doc["keys"][1]], "note": "x"} and len(doc["keys"]) == 2  # input untouched
    assert without_key(doc, "cccccccc") == (doc, None)


def test_a_revoked_key_is_refused_from_the_next_refresh(storage):
    now = [0.0]
    kept, revoked = add_stored_key(storage, "feedback"), add_stored_key(storage, "admin")
    ring = KeyRing(AuthConfig(), storage, refresh_s=5.0, clock=lambda: now[0])
    revoked_id = revoked.split("_")[1]
    assert ring.check(f"Bearer {revoked}", "admin") == revoked_id
    assert revoke_stored_key(AuthConfig(), storage, revoked_id.upper()).role == "admin"  # the same id in capitals
    assert revoked_id not in (storage.read_bytes("auth/keys.json") or b"").decode()
    now[0] = 4.0
    assert ring.check(f"Bearer {revoked}", "admin") == revoked_id  # the cached set, for at most 5 s
    now[0] = 5.1
    with pytest.raises(Unauthorized):
        ring.check(f"Bearer {revoked}", "admin")
    assert ring.check(f"Bearer {kept}", "feedback") == kept.split("_")[1]


def test_a_servers_key_refresh_never_holds_a_request_on_a_slow_key_file(storage):
    """A replica's event loop read the key file inline every 5 s: a slow bucket froze every
    request it held. On a thread's timer, the last good set answers while the file is read,
    and a revoked key is still refused within refresh_s without a request to set it off."""
    import threading
    import time

    key, other = add_stored_key(storage, "feedback"), add_stored_key(storage, "admin")
    ring = KeyRing(AuthConfig(), storage, refresh_s=0.2, background=True)  # read here, when built
    try:
        released, read = threading.Event(), threading.Event()
        real = storage.read_document

        def slow(rel):
            read.set()
            released.wait(10)
            return real(rel)
        storage.read_document = slow
        assert read.wait(5)  # the refresher is reading, slowly
        started = time.monotonic()
        assert ring.check(f"Bearer {key}", "feedback") == key.split("_")[1]  # the last set, at once
        assert time.monotonic() - started < 5  # the read it would have waited for takes 10 s
        storage.read_document = real
        released.set()
        revoke_stored_key(AuthConfig(), storage, other.split("_")[1])
        deadline = time.monotonic() + 10  # checks read nothing: only the timer can pick it up
        while True:
            try:
                ring.check(f"Bearer {other}", "admin")
            except Unauthorized:
                break
            assert time.monotonic() < deadline, "the revoked key was still accepted after 10 s"
            time.sleep(0.05)
        reads = []

        def counted(rel):
            reads.append(rel)
            return real(rel)
        storage.read_document = counted
        storage.write_bytes_atomic("auth/keys.json", b"[" * 100_000 + b"]" * 100_000)  # past the JSON parser
        reads.clear()
        deadline = time.monotonic() + 10
        while len(reads) < 2:  # a second read: the first, of the unparseable file, went through the parser
            assert time.monotonic() < deadline, "the refresher stopped reading the key file"
            time.sleep(0.05)
        assert ring.check(f"Bearer {key}", "feedback")  # the last good set stays, and the thread lives
        assert [t for t in threading.enumerate() if t.name == "api-key-refresh"]
    finally:
        ring.close()


def test_revoke_refuses_unknown_ids_and_keys_that_live_elsewhere(storage, monkeypatch):
    add_stored_key(storage, "admin")
    before = storage.read_bytes("auth/keys.json")
    with pytest.raises(RevokeError, match="no key with id 'cccccccc'.*keys list"):
        revoke_stored_key(AuthConfig(), storage, "cccccccc")
    with pytest.raises(RevokeError, match="no key with id 'cccccccc'"):  # capitals: the same id, not "not 8 hex digits"
        revoke_stored_key(AuthConfig(), storage, "CCCCCCCC")
    config_key = ApiKeyConfig(id="dddddddd", role="admin", sha256="0" * 64)
    with pytest.raises(RevokeError, match="dddddddd comes from the config's auth.keys"):
        revoke_stored_key(AuthConfig(keys=[config_key]), storage, "dddddddd")
    env_key, env_rec = new_key("feedback")
    monkeypatch.setenv(KEYS_ENV, f"feedback:{env_key}")
    with pytest.raises(RevokeError, match=f"{env_rec.id} comes from {KEYS_ENV}"):
        revoke_stored_key(AuthConfig(), storage, env_rec.id)
    pasted, _ = new_key("admin")  # the whole key where its id belongs: never echoed
    with pytest.raises(RevokeError) as info:
        revoke_stored_key(AuthConfig(), storage, pasted)
    assert pasted.split("_")[2] not in str(info.value) and "8 hex digits" in str(info.value)
    assert storage.read_bytes("auth/keys.json") == before  # nothing changed


def _create_keys(root: str, n: int, start, out) -> None:
    os.environ.pop(KEYS_ENV, None)
    storage = Storage(root)
    start.wait()
    out.put([add_stored_key(storage, "feedback").split("_")[1] for _ in range(n)])


def test_concurrent_key_creation_from_several_processes_loses_no_key(storage):
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_create_keys, args=(storage.root, 10, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    created = [key_id for _ in procs for key_id in out.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0] * 4
    assert sorted(k.id for k in read_key_file(storage)[1]) == sorted(created) and len(created) == 40


@pytest.mark.parametrize(("content", "problem"), [
    (b"{not json", "is not valid JSON"),
    (b"\xff\xfe", "is not valid JSON"),
    (b"[]", 'must be a JSON object {"keys": [...]}, not a JSON array'),
    (b'{"keys": {}}', '"keys" must be a JSON array, not a JSON object'),
    (b'{"keys": ["x"]}', "keys[0] must be a JSON object"),
    (b'{"keys": [{"role": "admin", "sha256": "%s"}]}' % (b"0" * 64), "keys[0]: id must be 8 hex digits, not nothing"),
    (b'{"keys": [{"id": "aaaaaaaa", "role": "owner", "sha256": "%s"}]}' % (b"0" * 64),
     "keys[0] (id aaaaaaaa): role must be one of ['predict', 'feedback', 'admin', 'metrics'], not 'owner'"),
    (b'{"keys": [{"id": "aaaaaaaa", "role": "admin", "sha256": "abc"}]}', "sha256 must be 64 hex digits, not 'abc'"),
])
def test_a_bad_key_file_names_the_file_and_the_problem(storage, content, problem):
    os.makedirs(storage.path("auth"))
    with open(storage.path("auth/keys.json"), "wb") as f:
        f.write(content)
    with pytest.raises(KeyFileError) as info:
        KeyRing(AuthConfig(), storage).keys()
    assert storage.path("auth/keys.json") in str(info.value) and problem in str(info.value)
    with pytest.raises(KeyFileError):  # a file it cannot read is never overwritten
        add_stored_key(storage, "admin")
    with open(storage.path("auth/keys.json"), "rb") as f:
        assert f.read() == content


def test_a_key_pasted_into_the_key_file_is_not_echoed(storage):
    key, rec = new_key("admin")
    storage.write_json_atomic("auth/keys.json", {"keys": [{"id": key, "role": "admin", "sha256": rec.sha256}]})
    with pytest.raises(KeyFileError) as info:
        read_key_file(storage)
    assert key.split("_")[2] not in str(info.value) and "a string of 44 characters" in str(info.value)


def test_a_key_file_turning_corrupt_keeps_the_last_good_keys_and_logs_once(storage, caplog):
    now = [0.0]
    key = add_stored_key(storage, "feedback")
    ring = KeyRing(AuthConfig(), storage, refresh_s=5.0, clock=lambda: now[0])
    assert ring.check(f"Bearer {key}", "feedback")
    good = storage.read_bytes("auth/keys.json")
    storage.write_bytes_atomic("auth/keys.json", b'{"keys": [')
    with caplog.at_level(logging.ERROR, logger="tuneloop"):
        for t in (6.0, 12.0, 18.0):
            now[0] = t
            assert ring.check(f"Bearer {key}", "feedback") == key.split("_")[1]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "not valid JSON" in errors[0].getMessage()
    assert "still using the keys loaded before" in errors[0].getMessage()
    storage.write_bytes_atomic("auth/keys.json", good)
    revoke_stored_key(AuthConfig(), storage, key.split("_")[1])
    now[0] = 24.0
    with pytest.raises(Unauthorized):  # valid again: read again
        ring.check(f"Bearer {key}", "feedback")


def test_without_any_good_key_set_keyed_requests_get_503_and_open_ones_still_work(storage):
    now = [0.0]
    storage.write_bytes_atomic("auth/keys.json", b"{broken")
    ring = KeyRing(AuthConfig(), storage, refresh_s=5.0, clock=lambda: now[0])
    assert ring.check(None, "predict") is None  # without a key nothing is read: as usual
    with pytest.raises(Unauthorized):
        ring.check(None, "feedback")
    key, _ = new_key("feedback")
    for role in ("feedback", "predict"):  # a key given is checked, also for an open role
        with pytest.raises(KeyStoreUnavailable) as info:
            ring.check(f"Bearer {key}", role)
        e = info.value
        assert isinstance(e, TuneloopError) and e.status == 503 and e.code == "auth_unavailable"
        assert e.headers == {"Retry-After": "5"} and "keys.json" not in e.message  # no server paths to clients
    storage.write_json_atomic("auth/keys.json", {"keys": []})  # repaired
    good = add_stored_key(storage, "feedback")
    now[0] = 5.1
    assert ring.check(f"Bearer {good}", "feedback") == good.split("_")[1]


def test_the_first_admin_key_goes_to_a_private_file(storage):
    key = add_stored_key(storage, "admin")
    path = save_admin_key(storage, key)
    assert path == storage.path("auth/admin-key.txt")
    assert os.stat(path).st_mode & 0o777 == 0o600
    with open(path) as f:
        assert f.read() == f"{key}\n"
    assert json.loads(storage.read_bytes("auth/keys.json"))["keys"][0]["id"] == key.split("_")[1]


def test_run_stops_before_anything_starts_on_a_bad_key_file(storage):
    from tuneloop.core.config import parse_config
    from tuneloop.control.server import run_forever

    storage.write_bytes_atomic("auth/keys.json", b'{"keys": [{"id": "nothex!!"}]}')
    cfg = parse_config({"models": [{"name": "m", "base_model": "some/model", "labels": ["a", "b"]}],
                        "storage": {"root": storage.root}})
    with pytest.raises(SystemExit) as info:  # Ray is never started (conftest would fail the test)
        run_forever(cfg)
    assert str(info.value).startswith("tuneloop: cannot start: ") and "keys[0]: id must be 8 hex digits" in str(info.value)


def test_run_prints_where_the_first_admin_key_is_never_the_key(storage, capsys):
    from tuneloop.core.config import parse_config
    from tuneloop.control.server import announce_admin_key

    cfg = parse_config({"models": [{"name": "m", "base_model": "some/model", "labels": ["a", "b"]}],
                        "storage": {"root": storage.root}})
    announce_admin_key(cfg, storage)
    with open(storage.path("auth/admin-key.txt")) as f:
        key = f.read().strip()
    out = capsys.readouterr().out
    assert key.startswith("tl_") and key not in out and key.split("_")[2] not in out
    assert f"cat {storage.path('auth/admin-key.txt')}" in out
    announce_admin_key(cfg, storage)  # an admin key exists: nothing more
    assert capsys.readouterr().out == ""


def test_a_revoked_first_admin_key_is_not_made_again(tmp_path, monkeypatch):
    """Revoked because it leaked, it was minted again at the next start."""
    from tuneloop.core.auth import ApiKey
    from tuneloop.store.keys import read_key_file

    monkeypatch.delenv(KEYS_ENV, raising=False)
    storage, auth = Storage(str(tmp_path)), AuthConfig()
    key = ensure_admin_key(auth, storage)
    [made] = read_key_file(storage)[1]
    assert key is not None and isinstance(made, ApiKey) and made.role == "admin"
    revoke_stored_key(auth, storage, made.id)
    assert ensure_admin_key(auth, storage) is None and read_key_file(storage)[1] == []


def test_the_first_admin_key_of_a_bucket_root_is_written_on_this_machine_not_in_the_bucket(tmp_path, monkeypatch):
    import tempfile

    from tuneloop.store.keys import save_admin_key

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "machine"))
    (tmp_path / "machine").mkdir()
    bucket = Storage(str(tmp_path / "bucket"))
    bucket.is_local = False
    where = save_admin_key(bucket, "tl_00000000_" + "a" * 32)
    assert where.startswith(str(tmp_path / "machine")) and os.stat(where).st_mode & 0o777 == 0o600
    assert not (tmp_path / "bucket" / "auth" / "admin-key.txt").exists()


def test_a_header_sent_twice_is_a_400_not_the_first_one():
    """An admin key sent beside a metrics key acted as admin: the first header won."""
    from tuneloop.core.auth import single_header
    from tuneloop.core.errors import InvalidRequest

    assert single_header([], "Authorization") is None
    assert single_header(["Bearer k"], "Authorization") == "Bearer k"
    with pytest.raises(InvalidRequest, match="send one Authorization header, not 2"):
        single_header(["Bearer a", "Bearer b"], "Authorization")

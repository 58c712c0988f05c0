"""Keys, roles and the feedback rate limit, as pure functions."""

import pytest

from cluster.auth import Authorizer, RateLimiter, keys_from_doc, keys_from_env, new_key, stored_keys_doc
from cluster.errors import Forbidden, RateLimited, Unauthorized


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


def test_first_run_creates_one_admin_key_stored_hashed(tmp_path, monkeypatch):
    from cluster.auth import KEYS_ENV, KeyRing, ensure_admin_key
    from cluster.config import AuthConfig
    from cluster.storage import Storage

    monkeypatch.delenv(KEYS_ENV, raising=False)
    storage, auth = Storage(str(tmp_path)), AuthConfig()
    key = ensure_admin_key(auth, storage)
    assert key is not None and key not in (tmp_path / "auth/keys.json").read_text()
    assert ensure_admin_key(auth, storage) is None  # never a second one, never printed again
    ring = KeyRing(auth, storage, refresh_s=0)
    assert ring.check(f"Bearer {key}", "admin") == key.split("_")[1]
    env_key, _ = new_key("feedback")
    monkeypatch.setenv(KEYS_ENV, f"feedback:{env_key}")
    assert ring.check(f"Bearer {env_key}", "feedback")  # picked up without a restart
    assert ensure_admin_key(AuthConfig(create_admin_key=False), Storage(str(tmp_path / "other"))) is None

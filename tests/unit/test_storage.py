"""Storage: private file modes on a local root, and the lock for read-modify-write."""

import io
import os
import stat
import threading
import time

import pyarrow as pa
import pytest

from tuneloop.store.storage import Storage
from tests.concurrency import in_processes


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writes_are_private_and_a_root_storage_creates_is_0700(tmp_path):
    root = tmp_path / "new-root"
    storage = Storage(str(root))
    storage.write_json_atomic("auth/keys.json", {"keys": []})
    storage.write_parquet_atomic("feedback/m/date=2024-01-01/x.parquet", pa.table({"a": [1]}))
    assert _mode(root) == 0o700
    for folder in ("auth", "feedback", "feedback/m", "feedback/m/date=2024-01-01"):
        assert _mode(root / folder) == 0o700, folder
    assert _mode(root / "auth/keys.json") == 0o600
    assert _mode(root / "feedback/m/date=2024-01-01/x.parquet") == 0o600
    assert storage.read_json("auth/keys.json") == {"keys": []}


def test_a_root_the_user_made_keeps_its_mode_and_old_files_are_tightened_on_rewrite(tmp_path):
    tmp_path.chmod(0o755)
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "state.json").chmod(0o644)
    storage = Storage(str(tmp_path))
    storage.write_json_atomic("state.json", {"v": 1})
    storage.write_bytes_atomic("sub/file.bin", b"x" * 100_000)
    assert _mode(tmp_path) == 0o755  # the user's choice; what is in it is private anyway
    assert _mode(tmp_path / "state.json") == 0o600
    assert _mode(tmp_path / "sub") == 0o700 and _mode(tmp_path / "sub/file.bin") == 0o600
    assert (tmp_path / "sub/file.bin").read_bytes() == b"x" * 100_000


def test_uploaded_and_downloaded_folders_are_private(tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "nested/weights.bin").write_bytes(b"w")
    for p in (src, src / "nested"):
        p.chmod(0o755)
    for p in (src / "config.json", src / "nested/weights.bin"):
        p.chmod(0o644)
    storage = Storage(str(tmp_path / "root"))
    storage.upload_dir(str(src), "registry/m/.staging")
    copy = tmp_path / "root/registry/m/.staging"
    assert [_mode(copy / p) for p in (".", "nested", "config.json", "nested/weights.bin")] == [0o700, 0o700, 0o600, 0o600]
    storage.download_dir("registry/m/.staging", str(tmp_path / "cache/m/v1"))
    back = tmp_path / "cache/m/v1"
    assert [_mode(back / p) for p in (".", "nested", "config.json", "nested/weights.bin")] == [0o700, 0o700, 0o600, 0o600]
    assert (back / "nested/weights.bin").read_bytes() == b"w"


def test_an_upload_makes_its_own_copies_private_and_leaves_the_rest_of_the_folder_alone(tmp_path, monkeypatch):
    """It walked the whole destination: two optimizations of a version at once, one deleting
    the build it replaced while the other's upload walked artifacts/, failed that upload
    (FileNotFoundError) with its files copied and recorded nowhere."""
    import os

    from tuneloop.store import storage as storage_module

    storage = Storage(str(tmp_path / "root"))
    for build in ("build_a", "build_b"):
        (tmp_path / build / build).mkdir(parents=True)
        (tmp_path / build / build / "model.onnx").write_bytes(b"m")
    storage.upload_dir(str(tmp_path / "build_a"), "registry/m/v1/artifacts")
    chmod = os.chmod

    def other_optimize_deletes_a(path, mode):  # the other optimize drops build_a mid-walk
        if (tmp_path / "root/registry/m/v1/artifacts/build_a").exists():
            storage.delete_dir("registry/m/v1/artifacts/build_a")
        chmod(path, mode)

    monkeypatch.setattr(storage_module.os, "chmod", other_optimize_deletes_a)
    storage.upload_dir(str(tmp_path / "build_b"), "registry/m/v1/artifacts")
    monkeypatch.undo()
    artifacts = tmp_path / "root/registry/m/v1/artifacts"
    assert sorted(p.name for p in artifacts.iterdir()) == ["build_b"]
    assert _mode(artifacts / "build_b") == 0o700 and _mode(artifacts / "build_b/model.onnx") == 0o600


def test_locked_makes_a_private_lock_file_and_releases_it_on_error(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    with pytest.raises(RuntimeError), storage.locked("auth/keys.lock"):
        raise RuntimeError("boom")
    assert _mode(tmp_path / "root/auth") == 0o700
    assert _mode(tmp_path / "root/auth/keys.lock") == 0o600
    done = threading.Event()

    def again():
        with storage.locked("auth/keys.lock"):
            done.set()

    t = threading.Thread(target=again)
    t.start()
    t.join(5)
    assert done.is_set()  # the lock was released by the exception


def _slow_increment(root: str, times: int, start) -> None:
    """A read-modify-write that loses updates unless it runs under the lock."""
    storage = Storage(root)
    start.wait()
    for _ in range(times):
        with storage.locked("counter.lock"):
            n = storage.read_json("counter.json")["n"]
            time.sleep(0.002)
            storage.write_json_atomic("counter.json", {"n": n + 1})


def test_locked_excludes_other_processes(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_json_atomic("counter.json", {"n": 0})
    in_processes(_slow_increment, (str(tmp_path), 15), n=4)
    assert storage.read_json("counter.json") == {"n": 60}


def _increment_by_update(root: str, times: int, start) -> None:
    storage = Storage(root)
    start.wait()
    for _ in range(times):
        storage.update_json("counter.json", lambda doc: {"n": (doc or {"n": 0})["n"] + 1})


def test_update_and_create_new_take_turns_across_processes(tmp_path):
    """The two calls every shared write goes through (object stores: tests/integration/
    test_object_store.py runs the same against a real S3 endpoint)."""
    storage = Storage(str(tmp_path))
    in_processes(_increment_by_update, (str(tmp_path), 15), n=3)
    assert storage.read_json("counter.json") == {"n": 45}
    assert storage.update_json("counter.json", lambda doc: None) == {"n": 45}  # None: keep it
    assert storage.create_new("claims/v1", b"a") and not storage.create_new("claims/v1", b"b")
    assert storage.read_bytes("claims/v1") == b"a"
    assert _mode(tmp_path / "claims/v1") == 0o600
    assert sorted(p.name for p in (tmp_path / "claims").iterdir()) == ["v1"]  # no temporary left


def test_a_write_that_fails_leaves_no_temporary_behind(tmp_path, monkeypatch):
    import errno

    storage = Storage(str(tmp_path))
    storage.write_bytes_atomic("a/b.json", b"{}")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    for _ in range(3):  # compaction and the prediction log retry every few seconds
        with pytest.raises(OSError, match="No space left"):
            storage.write_bytes_atomic("a/c.parquet", b"x" * 50_000)
        with pytest.raises(OSError, match="No space left"):
            storage.create_new("a/d.json", b"{}")
    assert sorted(os.listdir(tmp_path / "a")) == ["b.json"]


class _Store:
    """An object store's conditional writes over a dict, honouring If-None-Match and If-Match
    or not, as some S3-compatible stores do not."""

    def __init__(self, none_match: bool, match: bool):
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.none_match, self.match, self.puts = none_match, match, 0

    def read(self, path):
        data, token = self.objects.get(path, (None, None))
        return data, token

    def write(self, path, data, token):
        current = self.objects.get(path)
        if token is None and current is not None and self.none_match:
            return False
        if token is not None and (current is None or current[1] != token) and self.match:
            return False
        self.puts += 1
        self.objects[path] = (data, f"etag-{self.puts}")
        return True


@pytest.mark.parametrize(("none_match", "match", "ignored"), [
    (True, True, None), (False, True, "If-None-Match (create-only) on writes"),
    (True, False, "If-Match (compare-and-swap) on writes"),
    (False, False, "If-None-Match (create-only) and If-Match (compare-and-swap)")])
def test_an_object_store_that_ignores_conditional_writes_is_named_before_it_loses_updates(none_match, match, ignored):
    storage = Storage("mock:///bucket/tl")
    storage._writes = _Store(none_match, match)
    problem = storage.conditional_write_problem()
    if ignored is None:
        assert problem is None
    else:
        assert problem.startswith("storage root mock://bucket/tl") and f"ignores {ignored}" in problem
    assert Storage("/tmp").conditional_write_problem() is None  # a local root: link(2) and flock


def test_a_store_that_refuses_the_conditional_headers_is_named_not_a_traceback():
    class Refusing(_Store):
        def write(self, path, data, token):
            if token is not None or path in self.objects:
                raise RuntimeError("NotImplemented (501): A header you provided implies functionality that is not "
                                   "implemented")
            return super().write(path, data, token)

    storage = Storage("mock:///bucket/tl")
    storage._writes = Refusing(True, True)
    problem = storage.conditional_write_problem()
    assert problem.startswith("storage root mock://bucket/tl: writing a probe object with If-None-Match and If-Match "
                              "failed (RuntimeError: NotImplemented (501)")


def test_the_object_store_clients_errors_reach_callers_as_oserror_and_a_changes_own_pass():
    """boto3's NoCredentialsError or a 403 ClientError got past every `except OSError` of the
    CLI and the ingress: `tuneloop keys create` without credentials printed a traceback."""
    class NoCredentials(Exception):
        pass

    class Unauthorised(_Store):
        def write(self, path, data, token):
            raise NoCredentials("Unable to locate credentials")

    storage = Storage("mock:///bucket/tl")
    storage._writes = Unauthorised(True, True)
    with pytest.raises(OSError, match="cannot write mock://bucket/tl/auth/keys.json: NoCredentials: Unable to locate"):
        storage.update_json("auth/keys.json", lambda doc: {"keys": []})
    with pytest.raises(OSError, match="NoCredentials"):
        storage.create_new("models/m/v1.claim", b"1")

    class Conflict(Exception):
        pass

    def refuse(_doc):
        raise Conflict("production moved")
    storage._writes = _Store(True, True)
    with pytest.raises(Conflict):  # what the change itself raises is the caller's, not the store's
        storage.update_json("state.json", refuse)


def test_a_storage_root_pyarrow_cannot_open_is_a_config_error_naming_it():
    from tuneloop.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"storage.root 's3://bkt/tl\?endpointoverride=x' cannot be opened: .*query"):
        Storage("s3://bkt/tl?endpointoverride=x")  # endpoint_override, mistyped


def test_a_server_file_written_on_another_host_is_not_joined(tmp_path):
    """A bucket is shared by hosts: another host's `tuneloop run`, whose pid was alive here
    (a container's pid 1), was taken for a server of this host."""
    import os

    from tuneloop.store.server_file import remove_server_file, running_server_address, server_file, write_server_file

    storage = Storage(str(tmp_path))
    write_server_file(storage, "127.0.0.1:6379")
    assert running_server_address(storage) == "127.0.0.1:6379"  # this process, this host
    mine = storage.read_json(server_file())
    storage.write_json_atomic(server_file(), {**mine, "host": "another-host"})
    assert running_server_address(storage) is None
    storage.write_json_atomic(server_file(), {**mine, "pid": os.getppid()})  # another server of this host
    remove_server_file(storage)  # this process's stop leaves the other's file
    assert running_server_address(storage) == "127.0.0.1:6379"
    (tmp_path / server_file()).write_text('{"pid": ')  # cut: no server, not a traceback
    assert running_server_address(storage) is None


def test_s3_puts_refused_for_rate_are_sent_again_and_reads_survive_a_dropped_connection(monkeypatch):
    """A promote that hit S3's 503 SlowDown failed, though the store had written nothing; a
    read failed on one reset connection. Neither is sent again when it may have landed (a 500)."""
    import botocore.exceptions
    from botocore.stub import Stubber

    from tuneloop.store import conditional

    monkeypatch.setattr(conditional.time, "sleep", lambda s: None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    s3 = conditional._S3("s3://bucket/tl?region=us-east-1")
    put = {"Bucket": "bucket", "Key": "tl/state.json", "Body": b"{}", "IfMatch": '"e1"'}
    with Stubber(s3._client) as stub:
        stub.add_client_error("put_object", "SlowDown", "Please reduce your request rate.", 503, expected_params=put)
        stub.add_response("put_object", {"ETag": '"e2"'}, put)
        assert s3.write("bucket/tl/state.json", b"{}", '"e1"') is True
        stub.add_client_error("put_object", "InternalError", "We encountered an internal error.", 500, expected_params=put)
        with pytest.raises(botocore.exceptions.ClientError, match="InternalError"):
            s3.write("bucket/tl/state.json", b"{}", '"e1"')  # it may have landed: the caller's update fails
        stub.add_client_error("put_object", "PreconditionFailed", "", 412, expected_params=put)
        assert s3.write("bucket/tl/state.json", b"{}", '"e1"') is False
        stub.assert_no_pending_responses()

    calls = []

    def get_object(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise botocore.exceptions.EndpointConnectionError(endpoint_url="https://s3.example")
        return {"Body": io.BytesIO(b"{}"), "ETag": '"e2"'}

    monkeypatch.setattr(s3._client, "get_object", get_object)
    assert s3.read("bucket/tl/state.json") == (b"{}", '"e2"') and len(calls) == 2

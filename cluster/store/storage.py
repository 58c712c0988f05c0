"""The storage root: one URI, a local path or any pyarrow filesystem (s3://, gs://, ...).

Every write that others may read is atomic: written under a hidden temporary name, then
moved into place. On a local disk the file and its folder are fsynced, so a write that
returned survives a crash of the process or the machine.

What several processes, on several hosts, race for goes through two calls that work the
same on every kind of root: ``create_new`` (a claim: exactly one writer wins a name) and
``update`` (read-modify-write, compare-and-swap on object stores). There is no directory
rename anywhere: object stores cannot move a folder atomically.

On a local disk everything written here is private to the user running tuneloop: files
0600, folders this class creates 0700 (the root too, when it creates it). The root holds
predicted and corrected texts, model weights and the API key hashes, none of which other
users of the machine should read. Folders that exist already keep their mode: a root the
user made (a mount point, a folder shared with a group on purpose) is theirs to set, and
the files in it are 0600 anyway; ``chmod -R go= <root>`` tightens a root written by an
older tuneloop. On an object store the bucket's access policy applies instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import posixpath
import random
import time
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tuneloop.core.config import ConfigError
from tuneloop.store.conditional import ConditionalWrites, conditional_writes

FILE_MODE, DIR_MODE = 0o600, 0o700  # on a local root: private to the user running tuneloop
UPDATE_ATTEMPTS = 30  # compare-and-swap retries before giving up (backing off to 1 s: contention is a few writers)


class Storage:
    """A pyarrow filesystem plus the root path under it; all paths are relative to the root."""

    def __init__(self, root: str):
        if "://" in root:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(root)
            except pa.ArrowInvalid as e:  # a query parameter pyarrow does not take (a typo): a traceback per command
                raise ConfigError(f"storage.root {root!r} cannot be opened: {e}") from None
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(root).resolve())
        self.uri = root
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self._writes: ConditionalWrites | None = None  # object stores: made on first use

    def __reduce__(self):  # pickled into Ray tasks as just the URI
        return (Storage, (self.uri,))

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def location(self, rel: str) -> str:
        """Where ``rel`` is, as an operator writes it: a path, or ``s3://bucket/...`` (the
        URI's endpoint and options left out)."""
        return self.path(rel) if self.is_local else f"{self.uri.split('://', 1)[0]}://{self.path(rel)}"

    # -- reading -------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG or "name too long" in str(e).lower():  # no file can have it
                return None
            raise

    def read_document(self, rel: str) -> bytes | None:
        """A small document that writers replace whole (state.json, the key file, job
        records), as one version of it. On an object store it is read in one GET: pyarrow
        reads a size first, then ranges, and a document replaced in between came back cut
        (118 of 306 reads torn against a writer on the local S3 endpoint; none in one GET)."""
        if self.is_local:
            return self.read_bytes(rel)
        return self._vendor("read", rel, lambda: self._conditional().read(self.path(rel)))[0]

    def _vendor(self, what: str, rel: str, call: Callable[[], Any]) -> Any:
        """``call`` of the vendor's client (boto3, google-cloud-storage), its errors (no
        credentials, an endpoint out of reach, a 403) raised as OSError, as pyarrow raises
        its own: the CLI and the ingress answer those in a line (503 over HTTP); the
        client's own types reached users as tracebacks (`tuneloop keys create` without
        credentials)."""
        try:
            return call()
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - the vendor client's errors, of many types
            raise OSError(f"cannot {what} {self.location(rel)}: {type(e).__name__}: {e}") from e

    def read_json(self, rel: str) -> Any | None:
        raw = self.read_document(rel)
        return None if raw is None else json.loads(raw)

    def list_dir(self, rel: str) -> list[pafs.FileInfo]:
        """Direct children of a folder, hidden (temporary) entries left out; [] if absent."""
        listed = self._listing(pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False))
        return [i for i in listed if not i.base_name.startswith(".")]

    def list_files(self, rel: str, suffix: str = "") -> list[str]:
        """All files below a folder, recursively, as paths relative to the root, sorted."""
        out = []
        for info in self._listing(pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=True)):
            if info.type != pafs.FileType.File or not info.path.endswith(suffix):
                continue
            relpath = posixpath.relpath(info.path, self.root)
            if any(part.startswith(".") for part in relpath.split("/")):
                continue
            out.append(relpath)
        return sorted(out)

    def _listing(self, sel: pafs.FileSelector) -> list[pafs.FileInfo]:
        for _ in range(4):
            try:
                return self.fs.get_file_info(sel)
            except FileNotFoundError:
                # Locally, pyarrow stats each entry it read: a writer's temporary unlinked in
                # between fails the whole listing ("Cannot list directory"; 1 in 25 runs of
                # six concurrent publishers; job records' heartbeats and feedback compaction
                # write beside recursive listings all the time). The folder is there: list it again.
                continue
        return self.fs.get_file_info(sel)

    # -- writing -------------------------------------------------------------------------
    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        if self.is_local:
            tmp = self._write_temporary(final, data)
            try:
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            fsync_dir(posixpath.dirname(final))
        else:
            # Object stores publish an object whole on close, so no temporary is needed.
            with self.fs.open_output_stream(final) as f:
                f.write(data)

    def _write_temporary(self, final: str, data: bytes) -> str:
        """A fsynced private temporary beside ``final`` (local roots), for renaming or linking."""
        parent = posixpath.dirname(final)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}")
        self._create_dir(parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked (a large file, a full disk)
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            # A full disk is retried every few seconds (compaction, the prediction log): each
            # try left a hidden partial file, eating the space that came back.
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def write_json_atomic(self, rel: str, obj: Any) -> None:
        self.write_bytes_atomic(rel, json_bytes(obj))

    def write_parquet_atomic(self, rel: str, table: pa.Table) -> None:
        self.write_bytes_atomic(rel, parquet_bytes(table))

    def read_parquet(self, rel: str) -> pa.Table | None:
        """A Parquet file's table, or None if it is not there."""
        try:
            return pq.read_table(self.path(rel), filesystem=self.fs)
        except FileNotFoundError:
            return None

    def create_new(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if nothing is there yet; False (writing nothing) if it is. The
        claim that several writers, on several hosts, may race for: exactly one wins. Local:
        an fsynced temporary ``link(2)``-ed into place (fails on an existing name). Object
        stores: a create-only conditional put (``conditional.py``)."""
        if not self.is_local:
            return self._vendor("write", rel, lambda: self._conditional().write(self.path(rel), data, None))
        final = self.path(rel)
        tmp = self._write_temporary(final, data)
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        fsync_dir(posixpath.dirname(final))
        return True

    def update(self, rel: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Read-modify-write of a small file that several processes, on several hosts, may
        change at once. ``change(current bytes or None)`` returns the new bytes, or None to
        leave the file as it is; it may raise to abort. Returns what the file holds after.

        Local: under the file's flock (``locked``), so writers take turns. Object stores:
        compare-and-swap, the write refused if anyone wrote since the read, and then
        ``change`` runs again on the fresh copy: it must be a pure function of its input."""
        if self.is_local:
            with self.locked(_lock_name(rel)):
                current = self.read_bytes(rel)
                new = change(current)
                if new is None:
                    return current
                self.write_bytes_atomic(rel, new)
                return new
        writes = self._vendor("reach", rel, self._conditional)
        for attempt in range(UPDATE_ATTEMPTS):
            current, token = self._vendor("read", rel, lambda: writes.read(self.path(rel)))
            new = change(current)  # its own errors (a conflict, a bad key file) pass as they are
            if new is None:
                return current
            if self._vendor("write", rel, lambda: writes.write(self.path(rel), new, token)):  # noqa: B023
                return new
            time.sleep(random.uniform(0, min(1.0, 0.02 * 2 ** attempt)))  # contention: back off, with jitter
        raise RuntimeError(f"{self.path(rel)} kept changing under {UPDATE_ATTEMPTS} attempts to update it")

    def update_json(self, rel: str, change: Callable[[Any | None], Any | None]) -> Any | None:
        """``update`` of a JSON document: ``change(document or None)`` returns the new
        document, or None to keep it."""

        def as_bytes(raw: bytes | None) -> bytes | None:
            new = change(None if raw is None else json.loads(raw))
            return None if new is None else json_bytes(new)

        raw = self.update(rel, as_bytes)
        return None if raw is None else json.loads(raw)

    def conditional_write_problem(self) -> str | None:
        """Why this object store cannot hold tuneloop's shared state, or None where it can:
        a probe object written create-only twice, then twice at one version token. A store
        that ignores If-None-Match or If-Match (some S3-compatible ones) takes every write, so
        version claims and the compare-and-swap of state.json, keys and job leases would let
        the last writer win, silently. A local root (``link(2)``, ``flock``) needs no probe."""
        if self.is_local:
            return None
        # At the root, not in a folder of its own: pyarrow leaves a folder's marker object
        # behind when its last file goes.
        writes, path = self._conditional(), self.path(f".probe-{uuid.uuid4().hex}")
        root = self.location("").rstrip("/")
        try:
            if not writes.write(path, b"1", None):
                return f"storage root {root}: a create-only write of a new object was refused"
            ignored = ["If-None-Match (create-only)"] if writes.write(path, b"2", None) else []
            _, token = writes.read(path)
            if writes.write(path, b"3", token) and writes.write(path, b"4", token):
                ignored.append("If-Match (compare-and-swap)")
        except Exception as e:  # noqa: BLE001 - a store that refuses the headers (501), or cannot be reached
            return (f"storage root {root}: writing a probe object with If-None-Match and If-Match "
                    f"failed ({type(e).__name__}: {e}); tuneloop needs both for its shared state")
        finally:
            with contextlib.suppress(OSError):
                self.fs.delete_file(path)
        if ignored:
            return (f"storage root {root}: the object store ignores {' and '.join(ignored)} on writes, "
                    "so two writers of a version number, state.json, the key file or a job lease would both "
                    "succeed, the last one silently winning: use a store that honours conditional writes "
                    "(AWS S3 and GCS do; check an S3-compatible store's support for both headers)")
        return None

    def _conditional(self) -> ConditionalWrites:
        if self._writes is None:
            self._writes = conditional_writes(self.uri)
        return self._writes

    def upload_dir(self, local_dir: str, rel: str) -> None:
        self._create_dir(self.path(rel))
        pafs.copy_files(local_dir, self.path(rel), destination_filesystem=self.fs)
        if self.is_local:
            # copy_files creates with the umask's modes; the 0700 folder made above hides
            # the copies until they are made private here. The copies alone: walking all of
            # rel met another optimize's build of the version as it was deleted, and failed.
            _make_tree_private(self.path(rel), fsync=True, source=local_dir)

    def download_dir(self, rel: str, local_dir: str, wanted: Callable[[str], bool] | None = None) -> None:
        """Copy a folder to the local disk, as private as it is in a local root; with
        ``wanted``, only the files whose path below the folder it accepts."""
        make_private_dirs(local_dir)
        if wanted is None:
            pafs.copy_files(self.path(rel), local_dir, source_filesystem=self.fs)
        else:
            for file in self.list_files(rel):
                below = posixpath.relpath(file, rel)
                if wanted(below):
                    os.makedirs(os.path.join(local_dir, os.path.dirname(below)), exist_ok=True)
                    pafs.copy_files(self.path(file), os.path.join(local_dir, below), source_filesystem=self.fs)
        _make_tree_private(local_dir, fsync=False)

    def delete_dir(self, rel: str) -> None:
        self.fs.delete_dir(self.path(rel))

    def delete_file(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))

    def _create_dir(self, path: str) -> None:
        if self.is_local:
            make_private_dirs(path)
        else:
            self.fs.create_dir(path, recursive=True)

    # -- locking -------------------------------------------------------------------------
    @contextmanager
    def locked(self, rel: str) -> Iterator[None]:
        """Hold an exclusive lock named ``rel`` (e.g. ``auth/keys.lock``) for the block: for
        read-modify-write of a small file (the key file, a model's registry state) by
        several processes, which would otherwise lose each other's updates.

        On a local root: ``flock(LOCK_EX)`` on that file (created 0600 and kept: deleting
        a lock file others may be waiting on would let two holders in). It excludes other
        processes and other threads alike, and the kernel releases it when the holder
        dies, however it dies. Not re-entrant: do not nest the same lock.

        Local roots only: on an object store use ``update`` (compare-and-swap) instead."""
        lock = self.file_lock(rel, wait=True)
        try:
            yield
        finally:
            lock.release()

    def file_lock(self, rel: str, *, wait: bool) -> FileLock | None:
        """Take the flock ``rel`` of a local root and hold it until ``release()``, or until
        this process dies (the kernel frees it, however the process dies). ``wait=False``:
        None at once if another holder has it. Local roots only (see ``locked``)."""
        if not self.is_local:
            raise ValueError(f"file locks need a local storage root, not {self.uri!r}")
        path = self.path(rel)
        make_private_dirs(posixpath.dirname(path))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return FileLock(path, fd)


class FileLock:
    """A held flock on a local file (``Storage.file_lock``). The holder may write a line
    into the file saying who it is, so that a refused taker can name it."""

    def __init__(self, path: str, fd: int):
        self.path, self._fd = path, fd

    def write_holder(self, text: str) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{text}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # a forked child holding the fd must not keep it
            os.close(self._fd)
            self._fd = None


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _lock_name(rel: str) -> str:
    """The flock ``update`` takes for ``rel`` on a local root: hidden, beside it."""
    folder, name = posixpath.split(rel)
    return posixpath.join(folder, f".{name}.lock")


def json_bytes(obj: Any) -> bytes:
    """How the store writes a JSON document (also ``update``'s callers that parse it themselves)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def make_private_dirs(path: str) -> None:
    """``mkdir -p`` whose new folders are 0700 (and durable); existing ones keep their mode.
    For folders beside the storage layer too (the journal): ``Path.mkdir(parents=True,
    mode=0o700)`` gives only the last folder that mode, its parents the umask's."""
    path, missing = os.path.abspath(path), []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by another writer (of ours: 0700 too)
        os.chmod(folder, DIR_MODE)  # exactly 0700, whatever the umask
        fsync_dir(os.path.dirname(folder))


def _make_tree_private(top: str, fsync: bool, source: str | None = None) -> None:
    """Private modes (and synced, with ``fsync``) for the tree under ``top``, or, with
    ``source``, for the copies under ``top`` of ``source``'s tree alone."""
    for dirpath, dirnames, files in os.walk(source or top):
        here = dirpath if source is None else os.path.join(top, os.path.relpath(dirpath, source))
        for name in dirnames:
            os.chmod(os.path.join(here, name), DIR_MODE)
        for name in files:
            path = os.path.join(here, name)
            os.chmod(path, FILE_MODE)
            if fsync:
                _fsync_file(path)
        if fsync:
            fsync_dir(here)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_temp_dir(name: str) -> str:
    """``<tmp>/<name>-<uid>``, made 0700: for caches and sockets that must not sit at a
    path another user of the machine could create first (and fill) or read. Refuses a
    folder of that name that another user owns."""
    path = os.path.join(tempfile.gettempdir(), f"{name}-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user; refusing to use it")
    os.chmod(path, 0o700)
    return path

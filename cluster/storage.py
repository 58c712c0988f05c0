"""The storage root: one URI, a local path or any pyarrow filesystem (s3://, gs://, ...).

Every write that others may read is atomic: written under a hidden temporary name, then
moved into place. On a local disk the file and its folder are fsynced, so a write that
returned survives a crash of the process or the machine.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class Storage:
    """A pyarrow filesystem plus the root path under it; all paths are relative to the root."""

    def __init__(self, root: str):
        if "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(root).resolve())
        self.uri = root
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __reduce__(self):  # pickled into Ray tasks as just the URI
        return (Storage, (self.uri,))

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # -- reading -------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_json(self, rel: str) -> Any | None:
        raw = self.read_bytes(rel)
        return None if raw is None else json.loads(raw)

    def list_dir(self, rel: str) -> list[pafs.FileInfo]:
        """Direct children of a folder, hidden (temporary) entries left out; [] if absent."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        return [i for i in self.fs.get_file_info(sel) if not i.base_name.startswith(".")]

    def list_files(self, rel: str, suffix: str = "") -> list[str]:
        """All files below a folder, recursively, as paths relative to the root, sorted."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=True)
        out = []
        for info in self.fs.get_file_info(sel):
            if info.type != pafs.FileType.File or not info.path.endswith(suffix):
                continue
            relpath = posixpath.relpath(info.path, self.root)
            if any(part.startswith(".") for part in relpath.split("/")):
                continue
            out.append(relpath)
        return sorted(out)

    # -- writing -------------------------------------------------------------------------
    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        parent = posixpath.dirname(final)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}")
        self.fs.create_dir(parent, recursive=True)
        if self.is_local:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            fsync_dir(parent)
        else:
            # Object stores publish an object whole on close, so no temporary is needed.
            with self.fs.open_output_stream(final) as f:
                f.write(data)

    def write_json_atomic(self, rel: str, obj: Any) -> None:
        self.write_bytes_atomic(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_parquet_atomic(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes_atomic(rel, buf.getvalue())

    def move_dir(self, src_rel: str, dst_rel: str) -> None:
        """Publish a folder under its final name. Raises FileExistsError if taken."""
        dst = self.path(dst_rel)
        if self.is_local:
            # rename(2) onto an existing non-empty folder fails: that is our version lock.
            try:
                os.rename(self.path(src_rel), dst)
            except OSError as e:
                if Path(dst).exists():
                    raise FileExistsError(dst) from e
                raise
            fsync_dir(posixpath.dirname(dst))
        else:
            if self.exists(dst_rel):
                raise FileExistsError(dst)
            self.fs.move(self.path(src_rel), dst)

    def upload_dir(self, local_dir: str, rel: str) -> None:
        self.fs.create_dir(self.path(rel), recursive=True)
        pafs.copy_files(local_dir, self.path(rel), destination_filesystem=self.fs)
        if self.is_local:
            for dirpath, _, files in os.walk(self.path(rel)):
                for name in files:
                    _fsync_file(os.path.join(dirpath, name))
                fsync_dir(dirpath)

    def download_dir(self, rel: str, local_dir: str) -> None:
        pafs.copy_files(self.path(rel), local_dir, source_filesystem=self.fs)

    def delete_dir(self, rel: str) -> None:
        self.fs.delete_dir(self.path(rel))


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

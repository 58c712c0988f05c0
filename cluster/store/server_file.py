"""<storage>/servers/<host>.json: where a running `tuneloop run` keeps its Ray cluster's address.

One file per host: a bucket is shared by hosts, and one file for all let a second host's
server hide the first's from `tuneloop train` there, and either's stop delete the other's.
Read before Ray is imported (Ray fixes its auth mode at import), so no Ray here.
"""

from __future__ import annotations

import os
import re
import socket

from tuneloop.store.storage import Storage


def server_file() -> str:
    """This host's server file, relative to the storage root."""
    return f"servers/{re.sub(r'[^A-Za-z0-9._-]', '_', socket.gethostname())}.json"


def write_server_file(storage: Storage, gcs_address: str) -> None:
    storage.write_json_atomic(server_file(), {"pid": os.getpid(), "host": socket.gethostname(),
                                              "gcs_address": gcs_address})


def remove_server_file(storage: Storage) -> None:
    """Remove this host's server file if this process wrote it: a second `tuneloop run` that
    found the first running and stopped must not unlist it."""
    try:
        if (_read(storage) or {}).get("pid") == os.getpid():
            storage.fs.delete_file(storage.path(server_file()))
    except OSError:
        pass


def running_server_address(storage: Storage) -> str | None:
    """The GCS address of a `tuneloop run` on this storage, if its process is alive on this
    host (a file copied from another host, whose pid happened to be alive here, is not)."""
    info = _read(storage)
    if not info or info.get("host", socket.gethostname()) != socket.gethostname():
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except (OSError, KeyError, ValueError, TypeError):
        return None
    return info.get("gcs_address")


def _read(storage: Storage) -> dict | None:
    """The server file's document; None if absent, unreadable or cut (a server killed while
    writing it left no server to join)."""
    try:
        info = storage.read_json(server_file())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None

"""<storage>/server.json: where a running `tuneloop run` keeps its Ray cluster's address.

Read before Ray is imported (Ray fixes its auth mode at import), so no Ray here.
"""

from __future__ import annotations

import os
import socket

from tuneloop.store.storage import Storage

SERVER_FILE = "server.json"


def write_server_file(storage: Storage, gcs_address: str) -> None:
    storage.write_json_atomic(SERVER_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                            "gcs_address": gcs_address})


def remove_server_file(storage: Storage) -> None:
    try:
        storage.fs.delete_file(storage.path(SERVER_FILE))
    except OSError:
        pass


def running_server_address(storage: Storage) -> str | None:
    """The GCS address of a `tuneloop run` on this storage, if its process is alive on this
    host. A bucket is shared by hosts: another host's server, whose pid happened to be alive
    here (a container's pid 1), was taken for one to join."""
    info = storage.read_json(SERVER_FILE)
    if not info or info.get("host", socket.gethostname()) != socket.gethostname():
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except (OSError, KeyError, ValueError, TypeError):
        return None
    return info.get("gcs_address")

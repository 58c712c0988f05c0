"""A node's copies of remote versions (``Registry.local_path`` on an object store): downloaded
whole or not at all, refreshed when the version is optimized again, and pruned.

Layout: ``<cache>/<root>/<model>/<version>/``, ``<root>`` a hash of the storage root
(``cache_folder``), each copy with the manifest it was chosen by (which build of the
artifacts it holds). A download lands under a private name and is renamed into place; a
copy set aside is renamed before it is deleted, so no replica reads half a folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable

from tuneloop.store.manifest import ARTIFACTS, DATA_DIR, MANIFEST, Manifest, artifact_entries
from tuneloop.store.registry_state import VERSION_NAME, version_number
from tuneloop.store.storage import Storage, private_temp_dir


def cache_folder(storage_uri: str) -> str:
    """A folder of this node's cache for one storage root: two roots on one host (staging and
    production buckets, or a bucket wiped and made again) both have a sentiment v1, and one
    folder per model and version served the first root's weights for the second's."""
    return hashlib.sha256(storage_uri.encode()).hexdigest()[:16]


def local_copy(storage: Storage, folder: str, model: str, version: str, manifest: Manifest,
               cache_dir: str | None = None) -> str | None:
    """This node's copy of ``model``'s ``version``, in ``folder`` of a remote ``storage``
    (``manifest``: its manifest, read now), downloaded if it has none or it is stale: its
    weights and the artifacts its manifest names, not the tables it was trained on nor
    earlier builds' files, which no replica reads. Each download prunes the node's cache of
    the model (``prune_cache``). None if the copy was pruned meanwhile: read the manifest
    again (the version may be gone) and ask again."""
    cache = cache_dir or private_temp_dir("tuneloop-cache")
    models = os.path.join(cache, cache_folder(storage.uri), model)
    target = os.path.join(models, version)
    with contextlib.suppress(OSError):
        os.utime(target)  # used now, before anything else: prune_cache (another replica's) keeps it
    cached = _cached_manifest(target)
    if cached and cached.get("created_at") != manifest.created_at:
        # Another version of that name: the root's registry was made anew since (a bucket
        # emptied, or a prefix reused). Set aside whole, as a download is whole.
        _set_aside(target)
        cached = {}
    if not cached:
        named = artifact_entries(manifest.optimization)
        download(storage, folder, target, manifest,
                 lambda p: not p.startswith(f"{DATA_DIR}/") and (
                     not p.startswith(f"{ARTIFACTS}/") or p.split("/")[1] in named))
        prune_cache(models, keep=version)
    files = manifest.optimization and any(a.path for a in manifest.optimization.artifacts.values())
    if files and _cached_build(target) != manifest.optimization.built_at:  # torch-bf16 alone has no file
        # Optimized (or optimized again: a new build's folder, or the same file names of older builds)
        # after this copy was cached. The old files served under the new records would
        # be the artifacts whose parity the new build replaced.
        _refresh_artifacts(storage, folder, target, manifest)
    return target if os.path.isdir(target) else None  # pruned between our look and now (unused for an hour)


def _refresh_artifacts(storage: Storage, folder: str, target: str, manifest: Manifest) -> None:
    """The version's artifacts folder anew, then the cached manifest that says which build
    it holds. A session already open on an old file keeps it (Linux keeps an open file)."""
    artifacts = os.path.join(target, ARTIFACTS)
    fresh, stale = f"{artifacts}.fresh-{uuid.uuid4().hex}", f"{artifacts}.stale-{uuid.uuid4().hex}"
    named = artifact_entries(manifest.optimization)
    try:  # a download that fails midway leaves nothing: it left a partial build per reload tick
        storage.download_dir(f"{folder}/{ARTIFACTS}", fresh, lambda p: p.split("/")[0] in named)
        try:
            if os.path.isdir(artifacts):
                os.rename(artifacts, stale)
            os.rename(fresh, artifacts)
        except OSError:  # another replica of this node swapped in the same build meanwhile
            pass
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    _write_cached_manifest(target, manifest)  # what the folder now holds


def download(storage: Storage, folder: str, target: str, manifest: Manifest | None = None,
             wanted: Callable[[str], bool] | None = None) -> None:
    """``folder`` of the storage (the files ``wanted`` accepts) to the local ``target``,
    whole or not at all: into a private name first, then renamed. With ``manifest``
    (the one whose files were chosen), the copy's manifest is that one: a rebuild landing
    during the download named files this copy does not hold."""
    partial = f"{target}.partial-{uuid.uuid4().hex}"
    try:
        storage.download_dir(folder, partial, wanted)
        if manifest is not None:
            _write_cached_manifest(partial, manifest)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(partial, target)
    except OSError:
        if not os.path.isdir(target):
            raise
        # a concurrent download won; its copy is identical
    finally:  # what a broken or losing download left: a whole model's copy each time
        shutil.rmtree(partial, ignore_errors=True)


def _cached_manifest(target: str) -> dict:
    """The manifest copied with a cached version ({} when there is none, or it cannot be read:
    fetch the version anew)."""
    try:
        with open(os.path.join(target, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _cached_build(target: str) -> str | None:
    """Which build of the artifacts a cached copy holds: its manifest's ``built_at``."""
    return (_cached_manifest(target).get("optimization") or {}).get("built_at")


CACHE_KEEP_VERSIONS = 3  # a node's cached versions of a model kept besides any used within the hour
CACHE_KEEP_USED_S = 3600.0


def prune_cache(models_dir: str, keep: str, now: float | None = None) -> list[str]:
    """Remove a node's cached versions of one model (``models_dir``: its folders by version)
    but ``keep``, the newest CACHE_KEEP_VERSIONS, and any used within CACHE_KEEP_USED_S
    (``local_path`` touches a version each time it hands it out); and what killed downloads
    left (``.partial-*``, ``.stale-*``) over that age. Continuous training cached every version
    ever served on every node, a few hundred MB each, until the disk filled. Returns the
    versions removed. A replica still serving a removed version keeps its files open (Linux
    frees them on close); one loading it again downloads it again."""
    now = time.time() if now is None else now
    try:
        entries = os.listdir(models_dir)
    except OSError:
        return []
    versions = sorted((e for e in entries if VERSION_NAME.match(e)), key=version_number)
    kept = {keep, *versions[-CACHE_KEEP_VERSIONS:]}
    removed = []
    for version in versions:  # what a process killed mid-refresh left inside a version
        _prune_refresh_leftovers(os.path.join(models_dir, version), now)
    for entry in entries:
        leftover = ".partial-" in entry or ".stale-" in entry
        if entry in kept or not (leftover or entry in versions):
            continue
        try:
            if now - os.stat(os.path.join(models_dir, entry)).st_mtime < CACHE_KEEP_USED_S:
                continue
        except OSError:
            continue
        _set_aside(os.path.join(models_dir, entry))
        removed.append(entry)
    return removed


def _prune_refresh_leftovers(version_dir: str, now: float) -> None:
    """The ``artifacts.fresh-*`` and ``artifacts.stale-*`` folders of a refresh whose process
    was killed between its renames, over CACHE_KEEP_USED_S old (a refresh under way is younger)."""
    try:
        entries = os.listdir(version_dir)
    except OSError:
        return
    for entry in entries:
        if entry.startswith((f"{ARTIFACTS}.fresh-", f"{ARTIFACTS}.stale-")):
            path = os.path.join(version_dir, entry)
            with contextlib.suppress(OSError):
                if now - os.stat(path).st_mtime >= CACHE_KEEP_USED_S:
                    shutil.rmtree(path, ignore_errors=True)


def _set_aside(path: str) -> None:
    """Remove a cached folder: renamed first, so no reader ever sees it half deleted."""
    stale = path if ".stale-" in path else f"{path}.stale-{uuid.uuid4().hex}"
    with contextlib.suppress(OSError):  # another replica of this node set it aside first
        os.rename(path, stale)
    shutil.rmtree(stale, ignore_errors=True)


def _write_cached_manifest(folder: str, manifest: Manifest) -> None:
    written = os.path.join(folder, f"{MANIFEST}.{uuid.uuid4().hex}")
    with open(written, "w") as f:
        json.dump(manifest.model_dump(mode="json"), f)
    os.replace(written, os.path.join(folder, MANIFEST))

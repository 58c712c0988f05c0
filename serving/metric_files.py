"""Every node's replica metrics, for the ingress's GET /metrics.

Replicas are processes on any node of the cluster; each writes prometheus-client's
multiprocess files under ``<$PROMETHEUS_MULTIPROC_DIR>/<its node id>`` (``use_node_folder``),
on that node's disk. The ingress, on one node, would see only its own node's. So at each
scrape it asks every live node, with a Ray task pinned there, for the used part of its
folder's files, and merges each node's (``metrics.render``: one series per node). On one machine there is nothing to
ask: the files are read where they are. (The node folder keeps two nodes of one machine,
as in the two-node test, from counting each other's files twice.)

A replica starting folds the files of its node's ended processes into one archive per
kind (serving/metric_compaction.py); readers hold the folder's lock shared meanwhile.

A node that does not answer within ``timeout_s`` is left out of that scrape (and logged), so
one slow node never fails /metrics; its series miss that scrape (a gap, not a counter reset).
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tuneloop.serving.metric_compaction import compact_ended, folder_lock
from tuneloop.serving.metrics import MULTIPROC_ENV

log = logging.getLogger(__name__)
NODE_TIMEOUT_S = 5.0


BASE_ENV = "TUNELOOP_METRICS_BASE"  # the configured folder, once use_node_folder moved this process below it


def use_node_folder() -> None:
    """Send this process's metrics to its node's folder below $PROMETHEUS_MULTIPROC_DIR. In a
    replica's constructor, before its first metric value (every tuneloop metric has labels,
    so none has a value before its first ``.labels()``). Once per process."""
    base = os.environ.get(MULTIPROC_ENV)
    if not base or os.environ.get(BASE_ENV) or not ray.is_initialized():
        return
    folder = os.path.join(base, ray.get_runtime_context().get_node_id())
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.environ[BASE_ENV], os.environ[MULTIPROC_ENV] = base, folder
    try:
        compact_ended(folder)  # churn leaves files of ended replicas: scrapes read them all
    except Exception as e:  # noqa: BLE001 - a full disk, say: the replica serves all the same
        log.warning("metrics: could not fold ended processes' files in %s: %s", folder, e)


def metrics_base() -> str | None:
    """The configured metrics folder (None: one process, no multiprocess files)."""
    return os.environ.get(BASE_ENV) or os.environ.get(MULTIPROC_ENV)


def _node_folder(base: str) -> str:
    return os.path.join(base, ray.get_runtime_context().get_node_id())


def node_label(node_id: str) -> str:
    """A node's value of the ``node`` label: its id's first 12 hex digits (as `ray status`
    abbreviates it; unique among a cluster's nodes in practice, and short in a legend)."""
    return node_id[:12]


def _used_bytes(path: str) -> bytes:
    """A multiprocess file's used part (its first 4 bytes say how much): a fresh file is
    64 KiB of which a few hundred bytes are metrics."""
    with open(path, "rb") as f:
        head = f.read(4096)
        used = struct.unpack_from("i", head, 0)[0]
        return head[:used] if used <= len(head) else head + f.read(used - len(head))


def _metric_files(base: str) -> list[str]:
    """This node's metric files below ``base``."""
    directory = _node_folder(base)
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, name) for name in sorted(os.listdir(directory)) if name.endswith(".db")]


@contextmanager
def _locked_files(base: str) -> Iterator[list[str]]:
    """This node's metric files, for the block, which a fold (``compact_ended``) waits out."""
    directory = _node_folder(base)
    if not os.path.isdir(directory):
        yield []
        return
    with folder_lock(directory, exclusive=False):
        yield _metric_files(base)


@ray.remote(num_cpus=0, max_retries=0)
def _node_files(base: str) -> dict[str, bytes]:
    out = {}
    with _locked_files(base) as paths:
        for path in paths:
            try:
                out[os.path.basename(path)] = _used_bytes(path)
            except (FileNotFoundError, struct.error):
                continue  # a live gauge's file removed as its process ended, or one just created
    return out


class IncompleteScrape(RuntimeError):
    """Some live node's metric files did not come (``cluster_metric_files(complete=True)``)."""


@contextmanager
def cluster_metric_files(base: str, timeout_s: float = NODE_TIMEOUT_S,
                         complete: bool = False) -> Iterator[dict[str, list[str]]]:
    """Paths of every live node's metric files below ``base``, by node label, for the block:
    on one machine the files where they are, else copies in a private temporary folder (one
    per scrape, so scrapes never share one). ``complete``: raise IncompleteScrape rather than
    leave a node out (a rollout's health baseline missing a node counted that node's whole
    history as the stage's once it answered)."""
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        with _locked_files(base) as paths:
            yield {node_label(ray.get_runtime_context().get_node_id()): paths}
        return
    refs = {node: _node_files.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
                                      ).remote(base) for node in nodes}
    ready, late = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    if late:
        log.warning("metrics: %d of %d nodes did not send their replicas' metrics within %.0fs; left out of this "
                    "scrape", len(late), len(refs), timeout_s)
        for ref in late:
            ray.cancel(ref, force=True)
    missing = len(late)
    with tempfile.TemporaryDirectory(prefix="tuneloop-metrics-") as into:
        paths: dict[str, list[str]] = {}
        for node, ref in refs.items():
            if ref not in ready:
                continue
            try:
                files = ray.get(ref)
            except ray.exceptions.RayError as e:  # the node went away mid-scrape
                log.warning("metrics: node %s: %s", node[:8], e)
                missing += 1
                continue
            folder = os.path.join(into, node)  # the file names as they were: prometheus-client reads the
            os.makedirs(folder)  # type, a gauge's mode and the pid from them (<type>[_<mode>]_<pid>.db)
            for name, data in files.items():
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)
            paths[node_label(node)] = [os.path.join(folder, name) for name in files]
        if complete and missing:
            raise IncompleteScrape(f"{missing} of {len(refs)} nodes did not send their replicas' metrics")
        yield paths

"""A replica's versions as it loads them: each on the runtime chosen for it, refused or tried
again when it does not load, and loaded anew when ``tuneloop optimize`` built it again.

``ModelServer`` holds the loaded versions (production, a rollout's challenger) and swaps its
references; this decides what a version loads as. A version trained for other labels is
refused for good (versions are immutable). One that fails to load (files missing or cut, a
download that broke, storage out of reach) is tried again after ``LOAD_RETRY_S``, doubling:
a failure raised to the replica stopped a new replica's start (a crash loop, even for a broken
challenger beside a good production) and kept running replicas from taking the rollout's
next state.

Under ``serving.runtime: auto`` the runtime is the fastest that passed parity on this
replica's hardware class (``cluster/core/runtimes.py``); a class no one measured is measured
here first, on the replica's compute thread, and recorded for the next replicas of the class.

Every version loaded is warmed up (``warm_up``) before it takes a request: its first batch ran
cold, and the replica's admission had no cost a unit of work until production's first warm
batches, so a burst at a new replica was all let in and timed out.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor

from tuneloop.core.batching_policy import work_units
from tuneloop.core.config import OptimizeConfig, ServingConfig
from tuneloop.core.runtimes import (Optimization, choose_lone_runtime, choose_runtime, hardware_class,
                                    serves_alone, unmeasured_runtimes)
from tuneloop.core.tasks import Task
from tuneloop.serving import metrics
from tuneloop.serving.loaded_models import LabelMismatch, LoadedModel, cpu_class
from tuneloop.serving.optimize import measure_runtimes, speed_texts
from tuneloop.store.registry import Registry

log = logging.getLogger(__name__)
LOAD_RETRY_S, LOAD_RETRY_MAX_S = 10.0, 600.0  # a version that failed to load is tried again, doubling
REBUILD_CHECK_S = 30.0  # how often a replica reads its versions' manifests for a new optimize build


# The warm-up batch: a few texts of a typical length. Long enough to time (8 x 128 tokens of
# MiniLM-L6 on one thread: tens of milliseconds), short enough that a large model's load is
# not held up for long on a CPU.
WARM_UP_TEXTS, WARM_UP_TOKENS = 8, 128
WARM_UP_SENTENCE = "The service reads this sentence while the model warms up before its first request. "


def warm_up(loaded: LoadedModel, serving: ServingConfig, window_stride: int | None) -> tuple[float, int]:
    """(seconds, units of work) of a warm batch of ``loaded``, after a cold one (and one short
    text for its lone-text runtime, if it has one): the cost a unit the replica admits
    requests by before production's own batches have run. Units as ``work_units`` counts a
    request's, so the two compare."""
    tokens = min(WARM_UP_TOKENS, serving.max_length)
    text = (WARM_UP_SENTENCE * (1 + 4 * tokens // len(WARM_UP_SENTENCE)))[:4 * max(1, tokens - 2)]
    texts = [text] * max(1, min(WARM_UP_TEXTS, serving.max_batch_size))
    loaded.predict(texts)  # cold: kernels chosen, caches and a GPU's libraries set up
    if loaded.lone is not None:
        loaded.predict([WARM_UP_SENTENCE])
    start = time.perf_counter()
    loaded.predict(texts)
    return time.perf_counter() - start, work_units(texts, serving.max_length, window_stride)


def retry_wait(failures: int) -> float:
    """Seconds before a load that failed ``failures`` times in a row is tried again."""
    return min(LOAD_RETRY_MAX_S, LOAD_RETRY_S * 2 ** (failures - 1))


class VersionLoader:
    """Loads ``model``'s versions for one replica with ``load_model`` (``load_model`` in
    ``loaded_models``, or a test's fake), measuring runtimes on ``compute`` (the replica's one
    compute thread)."""

    def __init__(self, model: str, task: Task, serving: ServingConfig, optimize: OptimizeConfig,
                 registry: Registry, load_model: Callable[..., LoadedModel], compute: Executor,
                 window_stride: int | None = None):
        self.model, self.task, self.serving, self.optimize = model, task, serving, optimize
        self.registry, self.load_model, self._compute = registry, load_model, compute
        self.window_stride = window_stride  # a task reading long texts in windows: work_units counts them
        self.allowed = tuple(optimize.runtimes)  # the artifacts the operator wants: others are not served
        self._parity_limits = optimize.min_agreement, optimize.max_accuracy_drop  # today's, not the build's
        self.runtimes: dict[str, tuple[str, str]] = {}  # version -> the runtime serving it, and why
        self.built_at: dict[str, str | None] = {}  # version -> the optimize build its runtime was chosen from
        self.refused: dict[str, str] = {}  # version -> why it cannot be served
        self.failed: dict[str, tuple[float, str, int]] = {}  # version -> (next try, why, tries) of a failed load
        # (version, build) -> (next try, tries) of a rebuild that did not load. Apart from
        # ``failed``, which says a replica is not ready and names the version: this one serves.
        self.rebuild_retry: dict[tuple[str, str | None], tuple[float, int]] = {}
        # Versions serving on torch because their artifact did not load: ``rebuilt`` tries the
        # artifact again, backing off, as it would a new build (a load that met another
        # replica's refresh between its renames stayed on torch until a restart).
        self.fell_back: set[str] = set()
        self.next_rebuild_check = time.monotonic() + REBUILD_CHECK_S

    def forget_all_but(self, wanted: set[str | None]) -> None:
        """Drop the failures and refusals of versions the state no longer names: /readyz went
        on reporting a rolled-back challenger as not loaded. One named again is tried at once."""
        for record in (self.failed, self.refused):
            for version in [v for v in record if v not in wanted]:
                record.pop(version, None)

    def load(self, version: str, serving: str | None) -> LoadedModel | None:
        """The version loaded, or None: refused (``refused``), or failed (``failed``) until its
        next try. ``serving``: the version this replica serves meanwhile, for the log."""
        if version in self.refused:
            # Never tried again, but counted at each look while the state names it: counted
            # once (or three times) at its refusal, the count could fall before a rollout's
            # stage began counting (up to evaluate_every_s after it), and the rollback rule
            # never saw it.
            metrics.VERSION_LOAD_FAILURES.labels(self.model, version).inc()
            return None
        failed = self.failed.get(version)
        if failed is not None and time.monotonic() < failed[0]:
            return None
        try:
            loaded = self.load_runtime(version)
        except LabelMismatch as e:
            metrics.VERSION_LOAD_FAILURES.labels(self.model, version).inc()
            self.refused[version] = str(e)
            log.error("model %s: %s; still serving %s", self.model, e, serving or "nothing")
            return None
        except Exception as e:  # noqa: BLE001 - serve what loads; this one is tried again later
            metrics.VERSION_LOAD_FAILURES.labels(self.model, version).inc()  # a challenger's rollout judges them
            tries = failed[2] + 1 if failed else 1
            wait = retry_wait(tries)
            self.failed[version] = (time.monotonic() + wait, f"{type(e).__name__}: {e}", tries)
            log.error("model %s: %s did not load (%s: %s); still serving %s; trying again in %.0f s", self.model,
                      version, type(e).__name__, e, serving or "nothing", wait)
            return None
        self.failed.pop(version, None)
        return loaded

    def load_runtime(self, version: str, fall_back: bool = True) -> LoadedModel:
        """``version`` on the runtime chosen for it; an artifact that does not load falls back
        to PyTorch, or with ``fall_back`` False raises (a replica serving an artifact already
        keeps it rather than swap it for PyTorch)."""
        path, optimization = self._version_files(version)
        built_at = optimization.built_at if optimization else None
        hardware = self._hardware()
        runtime, optimization, why = self._runtime_for(version, path, optimization, hardware)
        artifact = optimization.artifact_path(runtime) if optimization else None  # none: PyTorch serves
        did_not_load = None
        try:
            loaded = self.load_model(path, version, self.task, self.serving.max_length, runtime, artifact)
        except LabelMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - a broken or unloadable artifact: the weights still serve
            if runtime == "torch" or not fall_back:
                raise
            log.warning("model %s: %s's %s artifact did not load (%s: %s); serving it on torch",
                        self.model, version, runtime, type(e).__name__, e)
            why = f"the {runtime} artifact did not load: {type(e).__name__}"
            did_not_load, runtime = runtime, "torch"
            loaded = self.load_model(path, version, self.task, self.serving.max_length, runtime, None)
        why += self._with_lone_runtime(loaded, path, optimization, hardware, did_not_load)
        self._warm_up(loaded)
        self.runtimes[version], self.built_at[version] = (runtime, why), built_at
        if did_not_load:
            self.fell_back.add(version)
            _, tries = self.rebuild_retry.get((version, built_at), (0.0, 0))
            self.rebuild_retry[version, built_at] = time.monotonic() + retry_wait(tries + 1), tries + 1
        else:
            self.fell_back.discard(version)
        # A runtime the operator named and did not get is theirs to know at warning, not info
        # (optimize.enabled off, an artifact failing parity: PyTorch served and nothing said so).
        named_but_not = self.serving.runtime not in ("auto", "torch", runtime)
        log.log(logging.WARNING if named_but_not else logging.INFO, "model %s: %s runs on %s: %s", self.model,
                version, runtime, why)
        return loaded

    def rebuilt(self, resident: list[LoadedModel]) -> list[tuple[LoadedModel, LoadedModel]]:
        """(loaded, its replacement) for each of the ``resident`` versions whose manifest names
        another optimize build than the one its runtime was chosen from (``tuneloop optimize``
        ran since it loaded), loaded again on the runtime chosen now. Before, a rebuild
        reached a replica only at its restart or with the next version. Every
        ``REBUILD_CHECK_S``, one manifest read a resident version; not under runtime torch, nor
        on a GPU (the artifacts are CPU runtimes), where no build changes what serves; nor while
        a rollout holds two versions, whose reload would make three resident. A build that
        does not load (storage out of reach, an artifact this replica's ONNX Runtime cannot
        read) leaves the one serving, and is tried again after ``LOAD_RETRY_S``, doubling."""
        now = time.monotonic()
        if self.serving.runtime == "torch" or self.serving.num_gpus_per_replica > 0 or now < self.next_rebuild_check:
            return []
        self.next_rebuild_check = now + REBUILD_CHECK_S
        resident = list(dict.fromkeys(resident))  # a promoted challenger is production too
        if len(resident) > 1:
            return []
        swaps = []
        for current in resident:
            version = current.version
            optimization = self.registry.manifest(self.model, version).optimization
            built_at = optimization.built_at if optimization else None
            retry_at, tries = self.rebuild_retry.get((version, built_at), (0.0, 0))
            if (built_at == self.built_at.get(version) and version not in self.fell_back) or now < retry_at:
                continue
            # An artifact serving now is not swapped for PyTorch by a build whose artifact fails,
            # and PyTorch serving after a failed load is swapped only for the artifact.
            fall_back = current.runtime == "torch" and version not in self.fell_back
            try:
                swaps.append((current, self.load_runtime(version, fall_back=fall_back)))
            except Exception as e:  # noqa: BLE001 - the earlier build keeps serving; tried again later
                wait = retry_wait(tries + 1)
                self.rebuild_retry[version, built_at] = now + wait, tries + 1
                log.warning("model %s: %s was optimized again (build of %s), but it did not load (%s: %s); the "
                            "earlier build keeps serving it; trying again in %.0f s", self.model, version,
                            built_at, type(e).__name__, e, wait)
                continue
            self.rebuild_retry.pop((version, built_at), None)
            log.info("model %s: %s was optimized again (build of %s); swapped in", self.model, version, built_at)
        return swaps

    def _warm_up(self, loaded: LoadedModel) -> None:
        """``warm_up`` on the compute thread (a replica serving another version runs it between
        its batches); ``loaded.warm_batch`` its cost. One that fails leaves the version to warm
        up on its first batch, as before: a model that cannot read the warm-up sentence may
        still read its users' texts."""
        try:
            loaded.warm_batch = self._compute.submit(warm_up, loaded, self.serving, self.window_stride).result()
        except Exception as e:  # noqa: BLE001 - the version still serves; its first batch warms it
            log.warning("model %s: %s's warm-up batch failed (%s: %s); its first requests warm it up",
                        self.model, loaded.version, type(e).__name__, e)
            return
        seconds, units = loaded.warm_batch
        log.info("model %s: %s warmed up (%d units of work in %.3f s)", self.model, loaded.version, units, seconds)

    def _version_files(self, version: str) -> tuple[str, Optimization | None]:
        """(the version's folder, its manifest's optimization), the folder holding the files
        of every artifact that passed: an optimize build recorded between the two reads
        (local_path's and the manifest's) left the folder with the other build's files, and
        its artifacts served torch for good. Both are read anew, once."""
        def read() -> tuple[str, Optimization | None]:
            return (self.registry.local_path(self.model, version),
                    self.registry.manifest(self.model, version).optimization)

        if self.serving.runtime == "torch":  # no artifact serves: the manifest is not read
            return self.registry.local_path(self.model, version), None
        path, optimization = read()
        passed = [r.path for r in optimization.artifacts.values() if r.path and serves_alone(r)] if optimization else []
        return (path, optimization) if all(os.path.exists(os.path.join(path, f)) for f in passed) else read()

    def _runtime_for(self, version: str, path: str, optimization: Optimization | None,
                     hardware: str) -> tuple[str, Optimization | None, str]:
        """(runtime, the optimization it was chosen from, why) for ``version``:
        ``serving.runtime`` against the artifacts its manifest records, measured here first
        where no one measured them on ``hardware``, this replica's class."""
        if self.serving.runtime == "torch":
            return "torch", None, "serving.runtime is torch"
        unmeasured = unmeasured_runtimes(self.serving.runtime, optimization, hardware, self.allowed,
                                         self._parity_limits)
        if unmeasured and self.optimize.measure_on_replicas:
            optimization = self._measured_here(version, path, optimization, hardware, unmeasured)
        runtime, why = choose_runtime(self.serving.runtime, optimization, hardware, self.allowed,
                                      self._parity_limits)
        return runtime, optimization, why

    def _hardware(self) -> str:
        device = "cuda" if self.serving.num_gpus_per_replica > 0 else cpu_class()
        return hardware_class(device, self.serving.replica_threads)

    def _with_lone_runtime(self, loaded: LoadedModel, path: str, optimization: Optimization | None,
                           hardware: str, did_not_load: str | None) -> str:
        """Give ``loaded`` the runtime that answers one text alone faster (``choose_lone_runtime``),
        if one does; what to add to why it runs as it does. One that does not load (or
        ``did_not_load`` just now) leaves the version on its one runtime, as does a replica
        whose batches hold one text at most (its batch runtime would never run)."""
        if self.serving.max_batch_size == 1:
            return ""
        lone, why = choose_lone_runtime(self.serving.runtime, optimization, hardware, loaded.runtime,
                                        self.allowed, self._parity_limits)
        if lone is None or lone == did_not_load:
            return ""
        try:
            loaded.answer_lone_texts_with(self.load_model(path, loaded.version, self.task, self.serving.max_length,
                                                          lone, optimization.artifact_path(lone)))
        except Exception as e:  # noqa: BLE001 - a broken artifact: the version's own runtime answers lone texts too
            log.warning("model %s: %s's %s artifact did not load for lone texts (%s: %s); %s answers them too",
                        self.model, loaded.version, lone, type(e).__name__, e, loaded.runtime)
            return ""
        return f"; {why}"

    def _measured_here(self, version: str, path: str, optimization: Optimization, hardware: str,
                       runtimes: list[str]) -> Optimization:
        """``optimization`` with the speeds of ``runtimes`` measured in this replica, on its
        ``hardware`` class, and recorded in the manifest for the next replicas of the class.
        On the compute thread: a replica already serving measures between its own batches,
        not beside them (each skewing the other), one runtime a task, so its batches wait for
        one runtime's timing (about 1.5 ``speed_seconds``), not all of them (four: 20 s,
        near a request's timeout). Whatever goes wrong, the speeds it had."""
        o, started = self.optimize, time.perf_counter()
        try:
            texts = speed_texts(self.registry, self.model, version, o.speed_batch_size, o.parity_max_rows)
            speeds, lone, failed = {}, {}, {}
            for runtime in runtimes:
                measured = self._compute.submit(
                    measure_runtimes,
                    lambda name: self.load_model(path, version, self.task, self.serving.max_length, name,
                                                 optimization.artifact_path(name)),
                    [runtime], texts, o.speed_batch_size, o.speed_seconds).result()
                for into, part in zip((speeds, lone, failed), measured):
                    into.update(part)
            log.info("model %s: %s's speeds on %s lacked %s; measured here in %.1f s (texts/s: %s)%s",
                     self.model, version, hardware, ", ".join(runtimes), time.perf_counter() - started,
                     ", ".join(f"{name} {speed:.0f}" for name, speed in speeds.items()),
                     "".join(f"; {name} did not run: {why}" for name, why in failed.items()))
            if "torch" not in speeds:  # the weights themselves did not run: loading them says why
                return optimization
            speeds = {name: round(speed, 1) for name, speed in speeds.items()}
            lone = {name: round(ms, 2) for name, ms in lone.items()}
            self.registry.record_speeds(self.model, version, hardware, speeds, optimization.built_at, lone)
        except Exception as e:  # noqa: BLE001 - storage, a lost race: served by the speeds it had
            log.warning("model %s: measuring %s's runtimes on %s failed (%s: %s); choosing by what was measured",
                        self.model, version, hardware, type(e).__name__, e)
            return optimization
        return optimization.measured_on(hardware, speeds, lone)

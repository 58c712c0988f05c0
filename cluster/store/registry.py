"""Model registry: immutable versions with manifests, and a state file naming production.

Layout under the storage root::

    registry/<model>/<version>/        save_pretrained output + manifest.json
    registry/<model>/state.json        {"production": "v2", "generation": 7, "history": [...]}
    registry/<model>/history/<g>.json  state.json's older history entries, from generation g on
    registry/<model>/.claims/<version> who took a version number (written first, never removed)
    registry/<model>/switches/<version>/<replica>.json
                                       when each serving replica started answering with a version
    registry/<model>/rollout_look.json the rollout driver's latest look at the rollout (why it holds)

Publishing works the same on a local disk and on an object store, where no folder can be
renamed: the publisher claims the next number (``Storage.create_new`` of its claim: one
winner however many race), copies the files into the version's folder, and writes the
manifest last. The manifest is the commit point: a version without one is invisible
(``versions`` skips it, ``manifest`` says unknown), so readers never see half a version,
and a publisher that dies mid-copy leaves a gap in the numbers, not a broken version.

Production moves only through ``Registry._transition``: a read-modify-write of state.json
(``Storage.update``: under a flock locally, compare-and-swap on object stores) that bumps
``generation`` and appends one history entry (older entries move to ``history/``,
``_archive_history``). A training job, an operator's promote and an
operator's rollback can race, from any host; they take turns, and ``expect_production``
lets a job refuse to overwrite a decision made while it ran. The state's documents and what
is read off them (rollback target, versions in service) are ``registry_state.py``'s.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from tuneloop.core.errors import Conflict, CorruptStoredFile, UnknownVersion
from tuneloop.core.runtimes import TORCH, Optimization
from tuneloop.core.rollout import Rollout, Stage
from tuneloop.core.serving_time import ServingTime
from tuneloop.store.documents import iso_time, now_iso, read_stored, update_stored
from tuneloop.store.manifest import ARTIFACTS, DATA_DIR, MANIFEST, Manifest, artifact_entries
from tuneloop.store.registry_state import (ARCHIVE_CHUNKS_AT_ONCE, VERSION_NAME, HistoryEntry, RegistryState,
                                           version_number)
from tuneloop.store.storage import Storage, parquet_bytes
from tuneloop.store.version_cache import local_copy

log = logging.getLogger(__name__)

GOLDEN = "golden.parquet"  # beside the versions: the model's frozen golden set
STATE = "state.json"
CLAIMS = ".claims"
SWITCHES = "switches"
LOOK = "rollout_look.json"  # the rollout driver's latest look at the model's rollout, a hold included
HISTORY = "history"


class _Unchecked:
    def __repr__(self) -> str:
        return "UNCHECKED"


UNCHECKED: Any = _Unchecked()
"""Default of ``expect_production``: change production whatever it is now. (None cannot be
the default: "expect no production yet" is what a job training v1 passes.)"""


def _with_other_classes(new: Optimization, old: Optimization | None) -> Optimization:
    """``new``, keeping ``old``'s speeds (texts/s, and times for one text alone) on the
    hardware classes ``new`` was not measured on, for the runtimes ``new`` still serves
    (PyTorch and its artifacts). Without the times alone, a rebuild from another machine
    took the lone-text runtime from every replica of the cluster's class, and nothing
    measured it again (its texts/s were there)."""
    if old is None:
        return new
    runtimes, ours = {TORCH, *new.artifacts}, {*new.texts_per_s, *new.lone_ms}

    def kept(by_class: dict[str, dict[str, float]], new_by_class: dict[str, dict[str, float]]) -> dict:
        theirs = {hardware: {name: value for name, value in values.items() if name in runtimes}
                  for hardware, values in by_class.items() if hardware not in ours}
        return {**{hardware: values for hardware, values in theirs.items() if values}, **new_by_class}

    return new.model_copy(update={"texts_per_s": kept(old.texts_per_s, new.texts_per_s),
                                  "lone_ms": kept(old.lone_ms, new.lone_ms)})


def _stage_of(rollout: Rollout) -> tuple:
    """Where a rollout stands: a step or a pause leaves another value."""
    return rollout.stage, rollout.step, rollout.stage_started_at


class _Unchanged(Exception):
    """A transition that would change nothing: state.json is left as it is (``state``)."""

    def __init__(self, state: RegistryState):
        super().__init__()
        self.state = state


class Registry:
    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def _dir(model: str, version: str | None = None) -> str:
        return f"registry/{model}/{version}" if version else f"registry/{model}"

    # -- versions ------------------------------------------------------------------------
    def versions(self, model: str) -> list[Manifest]:
        """Published versions, oldest first. One whose manifest cannot be read (edited by
        hand, cut, or written by a newer tuneloop) is left out with a warning naming it:
        it made every listing fail, and with it the ingress's start and a student's lineage."""
        out = []
        for info in self.storage.list_dir(self._dir(model)):
            if VERSION_NAME.match(info.base_name):
                try:
                    manifest = read_stored(self.storage, Manifest, f"{self._dir(model, info.base_name)}/{MANIFEST}")
                except CorruptStoredFile as e:
                    log.warning("%s %s left out of the versions listed: %s", model, info.base_name, e.message)
                    continue
                if manifest is not None:
                    out.append(manifest)
        return sorted(out, key=lambda m: version_number(m.version))

    def manifest(self, model: str, version: str) -> Manifest:
        if not VERSION_NAME.match(version):
            raise UnknownVersion(model, version)
        manifest = read_stored(self.storage, Manifest, f"{self._dir(model, version)}/{MANIFEST}")
        if manifest is None:
            raise UnknownVersion(model, version)
        return manifest

    def publish(self, model: str, local_dir: str, manifest: Manifest,
                tables: dict[str, pa.Table] | None = None) -> Manifest:
        """Copy a saved model folder in as the next version; returns the final manifest.
        ``tables`` (the rows it trained on, its replay reservoir) go in with it, as
        ``data/<name>.parquet``, so a version and its data appear together or not at all."""
        version = self._claim_version(model)
        folder = self._dir(model, version)
        final = manifest.model_copy(update={"version": version, "model": model})
        try:
            self.storage.upload_dir(local_dir, folder)
            for name, table in (tables or {}).items():
                self.storage.write_parquet_atomic(f"{folder}/{DATA_DIR}/{name}.parquet", table)
        except BaseException:
            # The copy failed (a full disk, a lost connection): take the weights back. The
            # claim stays, so the number is never reused; a crash here leaves the folder.
            if self.storage.exists(folder):
                self.storage.delete_dir(folder)
            raise
        self.storage.write_json_atomic(f"{folder}/{MANIFEST}", final.model_dump(mode="json"))  # the commit
        return final

    def latest_number(self, model: str) -> int:
        """The highest version number published or claimed (0: none), from two listings,
        no manifest read."""
        return max((version_number(i.base_name) for folder in (self._dir(model), f"{self._dir(model)}/{CLAIMS}")
                    for i in self.storage.list_dir(folder) if VERSION_NAME.match(i.base_name)), default=0)

    def _claim_version(self, model: str) -> str:
        """Take the next version number: the first one past every claim and folder that
        ``create_new`` gets. A claim is never given back, so a failed publish leaves a gap."""
        claims = f"{self._dir(model)}/{CLAIMS}"
        number = self.latest_number(model) + 1
        for _ in range(100):
            if self.storage.create_new(f"{claims}/v{number}", f"{uuid.uuid4().hex} {now_iso()}\n".encode()):
                return f"v{number}"
            number += 1  # another publisher took it
        raise RuntimeError(f"could not claim a version number for {model}")

    def table(self, model: str, version: str, name: str) -> pa.Table | None:
        """A table published with a version (``publish(tables=...)``), or None."""
        self.manifest(model, version)  # raises UnknownVersion
        return self.storage.read_parquet(f"{self._dir(model, version)}/{DATA_DIR}/{name}.parquet")

    def table_path(self, model: str, version: str, name: str) -> str:
        """Where a version's table lies (a path or URI of the storage), to read it with other tools."""
        return self.storage.location(f"{self._dir(model, version)}/{DATA_DIR}/{name}.parquet")

    def golden(self, model: str) -> pa.Table | None:
        """The model's frozen golden set, if one was frozen."""
        return self.storage.read_parquet(f"{self._dir(model)}/{GOLDEN}")

    def freeze_golden(self, model: str, table: pa.Table, replace: bool = False) -> pa.Table:
        """Freeze ``table`` as the model's golden set unless one is frozen already (then
        that one is returned), or with ``replace`` over it (a model that published no version
        yet)."""
        if replace:
            self.storage.write_bytes_atomic(f"{self._dir(model)}/{GOLDEN}", parquet_bytes(table))
            return table
        if self.storage.create_new(f"{self._dir(model)}/{GOLDEN}", parquet_bytes(table)):
            return table
        for _ in range(50):  # another job's write won: on S3 (409) it may still be landing
            frozen = self.golden(model)
            if frozen is not None:
                return frozen
            time.sleep(0.2)
        raise RuntimeError(f"the golden set of {model} was claimed by another job but never appeared")

    def record_serving_time(self, model: str, version: str, timing: ServingTime) -> Manifest:
        """Complete a published version's manifest with its feedback-to-serving time, which
        is known only after its rollout."""
        return self._update_manifest(model, version, lambda m: m.model_copy(update={"serving_time": timing}))

    def record_optimization(self, model: str, version: str, local_dir: str, optimization: Optimization) -> Manifest:
        """Add a version's optimized artifacts: the files of ``local_dir`` go in under the
        version's ``artifacts/`` folder first, then the manifest records them (its commit
        point, as at publishing: a replica reads an artifact only once the manifest names it),
        then what the manifest no longer names (an earlier build's folder) is removed. A
        build in a folder of its own (``tuneloop optimize`` names one per build) leaves the
        served files as they are until then: rebuilt under the same names, a replica loading
        meanwhile read a half-copied file, or the new build under the old build's parity.

        Speeds measured on other hardware classes stay, for the runtimes the new record
        still has: an operator's rebuild from another machine dropped the cluster's speeds,
        and every replica fell back to PyTorch at its next load."""
        self.manifest(model, version)  # raises UnknownVersion
        artifacts = f"{self._dir(model, version)}/{ARTIFACTS}"
        self.storage.upload_dir(local_dir, artifacts)
        replaced: list[Optimization | None] = [None]

        def record(before: Manifest) -> Manifest:
            replaced[0] = before.optimization
            return before.model_copy(update={"optimization": _with_other_classes(optimization, before.optimization)})

        manifest = self._update_manifest(model, version, record)
        # What the replaced record named and this one does not: a build under way beside
        # this one (a job's and an operator's) is named by neither, and keeps its files.
        for entry in artifact_entries(replaced[0]) - artifact_entries(optimization):
            gone = f"{artifacts}/{entry}"
            kind = self.storage.fs.get_file_info(self.storage.path(gone)).type
            if kind == pafs.FileType.Directory:
                self.storage.delete_dir(gone)
            elif kind == pafs.FileType.File:
                self.storage.delete_file(gone)
        return manifest

    def record_speeds(self, model: str, version: str, hardware: str, speeds: dict[str, float],
                      built_at: str | None, lone_ms: dict[str, float] | None = None) -> Manifest:
        """Add the texts/s (and milliseconds for one text alone) a replica measured on its own
        ``hardware`` class for the build made at ``built_at`` (``unmeasured_runtimes``) to the
        class's: later replicas of that class choose by them without measuring. A build
        recorded since (another ``built_at``) is left as it is: these speeds are of artifacts
        it replaced."""

        def record(manifest: Manifest) -> Manifest:
            optimization = manifest.optimization
            if optimization is None or optimization.built_at != built_at:
                return manifest
            measured = optimization.measured_on(hardware, {k: round(v, 1) for k, v in speeds.items()},
                                                {k: round(v, 2) for k, v in (lone_ms or {}).items()})
            return manifest.model_copy(update={"optimization": measured})

        return self._update_manifest(model, version, record)

    def _update_manifest(self, model: str, version: str, change: Callable[[Manifest], Manifest]) -> Manifest:
        """One field of a published manifest changed as one read-modify-write (``Storage.update``):
        a job recording its serving time while an operator's optimize recorded a build wrote
        back the manifest it had read, naming a build whose files the other had just removed."""
        if not VERSION_NAME.match(version):
            raise UnknownVersion(model, version)

        def apply(manifest: Manifest | None) -> Manifest:
            if manifest is None:
                raise UnknownVersion(model, version)
            return change(manifest)

        return update_stored(self.storage, Manifest, f"{self._dir(model, version)}/{MANIFEST}", apply)

    def record_switch(self, model: str, version: str, replica: str, at: datetime | None = None) -> None:
        """A serving replica started answering with ``version`` (once per replica and version)."""
        self.storage.write_json_atomic(f"{self._dir(model)}/{SWITCHES}/{version}/{replica}.json",
                                       {"at": iso_time(at or datetime.now(UTC))})

    def record_rollout_look(self, model: str, look: dict[str, Any]) -> None:
        """The rollout driver's latest look at ``model``'s rollout (``rollout_look``)."""
        self.storage.write_json_atomic(f"{self._dir(model)}/{LOOK}", look)

    def rollout_look(self, model: str) -> dict[str, Any] | None:
        """The rollout driver's latest look: when, at which rollout (version,
        ``stage_started_at``), its action, reason and numbers. A hold changes no state, so
        without it an operator could not tell why a canary stayed at 10% (too little feedback
        for ``min_feedback``, say). None when there is none, or it cannot be read."""
        try:
            look = self.storage.read_json(f"{self._dir(model)}/{LOOK}")
        except ValueError:  # cut mid-write by hand, or not JSON: only a status line is lost
            return None
        return look if isinstance(look, dict) else None

    def switches(self, model: str, version: str) -> list[datetime]:
        """When each replica that ever served ``version`` started to."""
        folder = f"{self._dir(model)}/{SWITCHES}/{version}"
        times = []
        for info in self.storage.list_dir(folder):
            raw = self.storage.read_json(f"{folder}/{info.base_name}")
            if raw and "at" in raw:
                times.append(datetime.fromisoformat(raw["at"]))
        return times

    def local_path(self, model: str, version: str, cache_dir: str | None = None) -> str:
        """A local folder holding the version's files: the storage's own on a local disk,
        else this node's copy (``version_cache.local_copy``), downloaded if it has none."""
        while True:
            manifest = self.manifest(model, version)  # raises UnknownVersion
            if self.storage.is_local:
                return self.storage.path(self._dir(model, version))
            copy = local_copy(self.storage, self._dir(model, version), model, version, manifest, cache_dir)
            if copy is not None:
                return copy

    # -- state ---------------------------------------------------------------------------
    def state(self, model: str) -> RegistryState:
        return read_stored(self.storage, RegistryState, f"{self._dir(model)}/{STATE}") or RegistryState()

    def production(self, model: str) -> str | None:
        return self.state(model).production

    def promote(self, model: str, version: str, reason: str = "",
                expect_production: str | None = UNCHECKED, force: bool = False,
                labels: list[str] | None = None, request: str | None = None,
                over_rollout: bool = True, dry_run: bool = False) -> RegistryState:
        """Make ``version`` production. With ``expect_production``, only if production is
        still that (None: still no production); otherwise raises Conflict naming the current
        one. A version the gate rejected needs ``force``; with ``labels`` (the config's), a
        version trained for other labels is refused. Raises UnknownVersion for a version
        that was never published. Without ``over_rollout`` (a job's own promotion), a
        rollout under way is a Conflict too: an operator's decision, which stands.
        ``dry_run``: the same checks, and the state it would write, unwritten."""
        self._servable(model, version, force, labels, "promote")

        def apply(state: RegistryState) -> HistoryEntry:
            # Its own version's too: an operator who started a canary of it while the job built
            # its artifacts decided how it takes traffic (the job's promotion ended that canary).
            if not over_rollout and state.rollout is not None:
                raise Conflict(f"{state.rollout.version} of {model!r} is being rolled out "
                               f"({state.rollout.stage}); that rollout stands")
            if version == state.production:
                if state.rollout is None:
                    raise _Unchanged(state)  # a retried promotion: nothing to record, rollback unmoved
                raise Conflict(f"{version} is production already, and {state.rollout.version} is being rolled out "
                               "beside it: roll back to end that rollout")
            if state.rollout is not None and state.rollout.version != version:
                reason_ = f"{reason}; the rollout of {state.rollout.version} ends with it"
            else:
                reason_ = reason
            state.rollout = None  # promoting the challenger ends its rollout too
            return HistoryEntry(at=now_iso(), event="promote", production=version, version=version, reason=reason_)

        return self._transition(model, apply, expect_production, request, dry_run)

    def _servable(self, model: str, version: str, force: bool, labels: list[str] | None, verb: str) -> None:
        """Raises UnknownVersion for a version never published, Conflict for one the gate
        rejected (without ``force``) or trained for other ``labels``: what refuses ``verb``."""
        manifest = self.manifest(model, version)  # raises UnknownVersion; manifests never change
        if manifest.status == "rejected" and not force:
            why = f" ({manifest.gate.reason})" if manifest.gate and manifest.gate.reason else ""
            raise Conflict(f"{version} was rejected by the gate{why}; to {verb} it anyway, force it "
                           '("force": true over HTTP, --force on the command line)')
        if labels is not None and not manifest.trained_for(labels):
            raise Conflict(f"{version} was trained for labels {manifest.labels}, the config has {labels}")

    def rollback(self, model: str, reason: str = "", expect_production: str | None = UNCHECKED,
                 request: str | None = None, labels: list[str] | None = None,
                 dry_run: bool = False) -> RegistryState:
        """Back to production alone: during a rollout, end it (the challenger never was
        production); otherwise go back to the production before the current one
        (``RegistryState.rollback_target``), worked out under the lock so that two rollbacks
        step back twice, not to the same version. Raises Conflict if there is nothing to
        roll back to (or, with ``expect_production``, if production is no longer that), or,
        given the config's ``labels``, if that version was trained for others: the replicas
        could not load it and kept serving the version rolled back from, while the state
        named the other (and a replica started later had nothing to serve)."""

        def apply(state: RegistryState) -> HistoryEntry:
            if state.rollout is not None:
                challenger, state.rollout = state.rollout.version, None
                return HistoryEntry(at=now_iso(), event="abort", production=state.production, version=challenger,
                                    reason=reason)
            target = state.rollback_target()
            if target is None:
                raise Conflict(f"{model!r} has no earlier production version to roll back to "
                               f"(production is {state.production or 'none'})")
            if labels is not None:
                try:
                    self._servable(model, target, True, labels, "roll back to")
                except Conflict as e:
                    raise Conflict(f"cannot roll back from {state.production} to {target}: {e.message}; promote a "
                                   "version trained for the config's labels instead") from None
            return HistoryEntry(at=now_iso(), event="rollback", production=target, version=target, reason=reason)

        return self._transition(model, apply, expect_production, request, dry_run)

    def record_candidate(self, model: str, version: str, reason: str = "") -> RegistryState:
        """Note in the history that ``version`` passed its gate but was left waiting, production
        unchanged (production moved while its job ran). An operator may promote it by hand."""
        self.manifest(model, version)

        def apply(state: RegistryState) -> HistoryEntry:
            return HistoryEntry(at=now_iso(), event="candidate", production=state.production, version=version,
                                reason=reason)

        return self._transition(model, apply, UNCHECKED)

    # -- rollouts (core/rollout.py) ------------------------------------------------------
    def start_rollout(self, model: str, version: str, stage: Stage, percent: float, reason: str = "",
                      expect_production: str | None = UNCHECKED, force: bool = False,
                      labels: list[str] | None = None, request: str | None = None) -> RegistryState:
        """Make ``version`` production's challenger, at ``stage`` (``percent``: the canary's
        share). Conflict if a rollout is under way, or (``expect_production``) production moved."""
        self._servable(model, version, force, labels, "roll out")

        def apply(state: RegistryState) -> HistoryEntry:
            if state.rollout is not None:
                raise Conflict(f"{state.rollout.version} of {model!r} is being rolled out ({state.rollout.stage}); "
                               "finish or roll back that rollout first")
            if version == state.production:
                raise Conflict(f"{version} is production already")
            if state.production is None:
                raise Conflict(f"{model!r} has no production version to roll {version} out beside: promote it "
                               "(a first version needs no rollout)")
            at = now_iso()
            state.rollout = Rollout(version=version, stage=stage, percent=percent, started_at=at, stage_started_at=at)
            return HistoryEntry(at=at, event="rollout", production=state.production, version=version,
                                reason=f"{stage}{f' {percent:g}%' if stage == 'canary' else ''}: {reason}")

        return self._transition(model, apply, expect_production, request)

    def advance_rollout(self, model: str, version: str, steps: list[float], reason: str = "",
                        numbers: dict[str, Any] | None = None, judged: Rollout | None = None,
                        request: str | None = None, seen: Rollout | None = None) -> RegistryState:
        """The challenger ``version`` goes one stage on (``Rollout.next_stage``): the next
        canary step, or production after the last. Conflict if it is not the challenger, or
        (``judged``: the rollout a decision was made on) if it moved or was paused since, or
        (``seen``: the rollout an operator saw, paused or not) if it moved since: an operator's
        step at 25% landing just after the controller's own step would skip the 50% stage."""

        def apply(state: RegistryState) -> HistoryEntry:
            rollout = self._rollout_of(model, state, version, judged)
            if seen is not None and _stage_of(rollout) != _stage_of(seen):
                raise Conflict(f"the rollout of {version} of {model!r} moved on to {rollout.stage} "
                               f"{rollout.percent:g}% since it was read: look again before stepping")
            at, nxt = now_iso(), rollout.next_stage(steps)
            if nxt is None:
                state.rollout = None
                return HistoryEntry(at=at, event="promote", production=version, version=version,
                                    reason=f"rollout done: {reason}", numbers=numbers)
            stage, step, percent = nxt
            state.rollout = rollout.model_copy(update={"stage": stage, "step": step, "percent": percent,
                                                       "stage_started_at": at, "alerted": False})
            return HistoryEntry(at=at, event="step", production=state.production, version=version,
                                reason=f"{stage} {percent:g}%: {reason}", numbers=numbers)

        return self._transition(model, apply, UNCHECKED, request)

    def mark_rollout(self, model: str, version: str, event: str, reason: str = "",
                     numbers: dict[str, Any] | None = None, judged: Rollout | None = None,
                     request: str | None = None) -> RegistryState:
        """``event``: "pause" (no automatic decision until "resume"), "resume", or "alert"
        (the evidence stays inconclusive: raised once a stage)."""
        flags = {"pause": {"paused": True}, "resume": {"paused": False}, "alert": {"alerted": True}}[event]

        def apply(state: RegistryState) -> HistoryEntry:
            rollout = self._rollout_of(model, state, version, judged)
            if event in ("pause", "resume") and rollout.paused == flags["paused"]:
                # Checked here, under the compare-and-set: two resumes at once both passed a
                # check made before it, and the second threw away the stage's evidence again.
                raise Conflict(f"the rollout of {version} is {'paused' if rollout.paused else 'running'} already")
            if event == "resume":  # its evidence starts again: the wait before an alert, and the alert, too
                flags.update(stage_started_at=now_iso(), alerted=False)
            state.rollout = rollout.model_copy(update=flags)
            return HistoryEntry(at=now_iso(), event=event, production=state.production, version=version,
                                reason=reason, numbers=numbers)

        return self._transition(model, apply, UNCHECKED, request)

    def abort_rollout(self, model: str, version: str, reason: str = "",
                      numbers: dict[str, Any] | None = None, judged: Rollout | None = None,
                      request: str | None = None) -> RegistryState:
        """End the rollout of the challenger ``version``: production alone takes the traffic."""

        def apply(state: RegistryState) -> HistoryEntry:
            self._rollout_of(model, state, version, judged)
            state.rollout = None
            return HistoryEntry(at=now_iso(), event="abort", production=state.production, version=version,
                                reason=reason, numbers=numbers)

        return self._transition(model, apply, UNCHECKED, request)

    def _archive_history(self, model: str, state: RegistryState) -> None:
        """Moves the state's oldest history chunks to history/<generation>.json while one is
        due (``RegistryState.archiving``), up to ARCHIVE_CHUNKS_AT_ONCE (a state.json of tens
        of thousands of entries, written before archiving existed, shrinks over a few changes);
        each file is written before the state that drops its entries."""
        now = datetime.now(UTC)
        for _ in range(ARCHIVE_CHUNKS_AT_ONCE):
            due = state.archiving(now)
            if due is None:
                return
            name, entries = due
            self.storage.write_json_atomic(f"{self._dir(model)}/{HISTORY}/{name}",
                                           [e.model_dump(mode="json") for e in entries])
            state.without_oldest(entries)

    @staticmethod
    def _rollout_of(model: str, state: RegistryState, version: str, judged: Rollout | None = None) -> Rollout:
        """The rollout of ``version``; with ``judged``, only while it is at the stage that
        decision judged and not paused: the controller reads feedback for seconds between
        looking and acting, and an operator's pause or step in between stands."""
        if state.rollout is None or state.rollout.version != version:
            now = f"{state.rollout.version} is" if state.rollout else "no version is"
            raise Conflict(f"{version} of {model!r} is not being rolled out ({now})")
        r = state.rollout
        if judged is not None and (r.paused or _stage_of(r) != _stage_of(judged)):
            raise Conflict(f"the rollout of {version} of {model!r} was paused or moved on since it was judged")
        return r

    def _transition(self, model: str, apply: Callable[[RegistryState], HistoryEntry],
                    expect_production: str | None, request: str | None = None,
                    dry_run: bool = False) -> RegistryState:
        """The one writer of state.json: read, check, append ``apply``'s entry, bump the
        generation and write, as one ``Storage.update``, so concurrent changes (from any
        process on any host) take turns and none is lost. ``apply`` may run more than once
        (compare-and-swap retries): it only reads the state it is given. A ``request`` the
        history already holds changes nothing: the state is answered as it is now.
        ``dry_run``: the same checks on the state as read, and nothing written."""
        rel = f"{self._dir(model)}/{STATE}"

        def change(state: RegistryState | None) -> RegistryState:
            # A state.json cut or edited by hand: 503 corrupt_stored_file, as its reads answer
            # (a promote or rollback on it was a 500 while the operator was repairing things).
            state = RegistryState() if state is None else state
            if state.carried_out(request):
                raise _Unchanged(state)  # a retry of a request that was carried out
            if expect_production is not UNCHECKED and state.production != expect_production:
                raise Conflict(f"production of {model!r} is now {state.production or 'none'} "
                               f"(generation {state.generation}), not {expect_production or 'none'}")
            entry = apply(state)
            state.generation += 1
            entry.generation, entry.request = state.generation, request
            state.production = entry.production
            state.history.append(entry)
            if not dry_run:
                self._archive_history(model, state)
            return state

        try:
            if dry_run:
                return change(read_stored(self.storage, RegistryState, rel))
            return update_stored(self.storage, RegistryState, rel, change)
        except _Unchanged as unchanged:
            return unchanged.state  # as read under the update: a second read could race a writer

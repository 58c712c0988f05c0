"""The registry's state of a model (``registry/<model>/state.json``): production, the rollout
under way, and the history of changes that moved them, the oldest moved to ``history/``
files with what readers still need of them (``ArchivedHistory``). Pure: the documents and
what can be read off them; ``Registry`` reads and writes them.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field

from tuneloop.core.errors import InvalidValue
from tuneloop.core.rollout import Rollout

VERSION_NAME = re.compile(r"^v([0-9]{1,9})\Z")  # ASCII digits; "v1\n" or a 300-digit name is no version

# Replicas read state.json every serving.reload_interval_s, and a model retrained hourly adds
# four or five entries an hour (candidate, rollout, steps, promote): years of them made it
# megabytes. It keeps at most ARCHIVE_AT entries; then the oldest HISTORY_CHUNK, once a
# day old (a burst of changes stays whole for a day), go to history/<n>.json. Fixed chunks
# give a chunk one content whichever writer archives it: compare-and-swap may run the
# change twice, or two writers each write the same file.
HISTORY_CHUNK = 100
ARCHIVE_AT = 2 * HISTORY_CHUNK
ARCHIVE_AFTER = timedelta(days=1)
ARCHIVE_CHUNKS_AT_ONCE = 20
ROLLBACK_DEPTH = 50  # the production versions a state remembers to roll back to, at most
# A job's reason starts with its id (store/jobs.py), after the stage a rollout's reason
# leads with ("shadow: job 0123456789abcdef: ...", ``Registry.start_rollout``).
_JOB_REASON = re.compile(r"^(?:(?:shadow|canary)(?: [0-9.]+%)?: )?job [0-9a-f]{16}\b")
BODY = " body="  # in a request id: what follows is the request body's fingerprint


def is_version_name(name: str | None) -> bool:
    return name is not None and VERSION_NAME.match(name) is not None


def version_number(version: str) -> int:
    m = VERSION_NAME.match(version)
    if not m:
        raise ValueError(f"not a version name: {version!r}")
    return int(m.group(1))


class HistoryEntry(BaseModel):
    """One change of the state. ``production`` is production after the event; ``version``
    is the version the event was about (for a candidate, the one left waiting);
    ``generation`` is the state's generation the change produced (None in entries written
    before generations existed)."""

    at: str
    # "promote", "rollback", "candidate"; a rollout's "rollout" (start), "step", "abort",
    # "pause", "resume" and "alert" (core/rollout.py)
    event: str
    production: str | None
    reason: str = ""
    version: str | None = None
    generation: int | None = None
    numbers: dict[str, Any] | None = None  # what an automatic decision saw
    # The operator's request that made it (an admin call's Idempotency-Key, with its key id
    # and action): a retried rollback then moves production once, not twice.
    request: str | None = None

    @property
    def decided_by(self) -> str:
        """automatic: the rollout driver, which records the numbers it saw; job: a training
        job promoting what its gate passed, or starting its rollout; operator: by hand."""
        if self.numbers is not None:
            return "automatic"
        return "job" if _JOB_REASON.match(self.reason) else "operator"

    def when(self) -> datetime:
        at = datetime.fromisoformat(self.at)
        return at if at.tzinfo else at.replace(tzinfo=UTC)


class ArchivedHistory(BaseModel):
    """What the entries moved from state.json to ``history/`` said that readers of the state
    need: where production was after them, what a rollback returns to, what was decided."""

    entries: int = 0  # how many
    production: str | None = None  # production after the last of them
    newest: int = 0  # the highest version number they name
    rollback_stack: list[str] = Field(default_factory=list)  # RegistryState.rollback_target's, after them
    decisions: dict[str, int] = Field(default_factory=dict)  # "<event> <decided_by>": how many


def _rollback_stack(entries: list[HistoryEntry], stack: list[str]) -> list[str]:
    """Production's versions to roll back to, newest last, after ``entries`` on top of
    ``stack``: promotions push, rollbacks pop; candidates and challengers never were
    production."""
    stack = list(stack)
    for entry in entries:
        if entry.event == "rollback":
            # Back to the entry's production: in state files from before a repeated promotion
            # was a no-op, a rollback could land where it started.
            if entry.production in stack:
                while stack[-1] != entry.production:
                    stack.pop()
            elif stack:
                stack.pop()
        elif entry.event == "promote" and entry.production is not None and stack[-1:] != [entry.production]:
            stack.append(entry.production)  # a repeated promotion (older state files have them) is one
    return stack


def _count_decisions(entries: list[HistoryEntry], counts: dict[str, int]) -> dict[str, int]:
    """``counts`` ("<event> <decided_by>": how many) with ``entries`` added."""
    out = dict(counts)
    for e in entries:
        out[f"{e.event} {e.decided_by}"] = out.get(f"{e.event} {e.decided_by}", 0) + 1
    return out


def _newest(entries: list[HistoryEntry], also: tuple[str | None, ...] = ()) -> int:
    """The highest version number ``entries`` (and ``also``) name; 0 if none."""
    named = [*also, *(v for e in entries for v in (e.production, e.version))]
    return max((version_number(v) for v in named if is_version_name(v)), default=0)


class RegistryState(BaseModel):
    production: str | None = None
    generation: int = 0
    rollout: Rollout | None = None  # the challenger under way, if any
    history: list[HistoryEntry] = Field(default_factory=list)  # the newest changes, oldest first
    archived: ArchivedHistory = Field(default_factory=ArchivedHistory)  # the older ones, in history/

    def carried_out(self, request: str | None) -> bool:
        """Whether an operator's ``request`` (``HistoryEntry.request``) is in the history.
        Raises InvalidValue (422) for its Idempotency-Key carried out with another body
        (``BODY``: a request id may end with its body's fingerprint)."""
        if request is None:
            return False
        asked = request.split(BODY)[0]
        for e in self.history:
            if e.request in (request, asked):  # the latter written before request ids had a body
                return True
            if e.request is not None and BODY in request and BODY in e.request and e.request.split(BODY)[0] == asked:
                raise InvalidValue(f"Idempotency-Key {asked.rsplit(' ', 1)[-1]!r} was used for a different "
                                   "request; use a new key per request")
        return False

    def in_service_since(self, since: datetime) -> set[str]:
        """The versions that took traffic at or after ``since``: production and the rollout's
        challenger now, and every version a change of the state since then named, or moved
        production away from (pure: ``since`` is the caller's clock)."""
        served = {self.production, self.rollout.version if self.rollout else None}
        before = self.archived.production  # production before each entry
        for entry in self.history:
            if entry.when() >= since:
                served |= {entry.production, entry.version, before}
            before = entry.production
        served.discard(None)
        return served

    def newest_named(self) -> int:
        """The highest version number the state names (0: none). Any version up to it that is
        not in service now left it, or never served: entries moved to history/ named the
        older ones."""
        return max(self.archived.newest, _newest(self.history, (self.production, self.rollout and self.rollout.version)))

    def decisions(self) -> dict[tuple[str, str], int]:
        """How many changes of each event each decider made: (event, decided_by) -> count,
        the archived ones included."""
        counts = _count_decisions(self.history, self.archived.decisions)
        return {tuple(key.split(" ", 1)): n for key, n in counts.items()}

    def rollback_target(self) -> str | None:
        """The production before the current one: promotions stack up, rollbacks pop, so
        rolling back twice after v1, v2, v3 lands on v1 (``_rollback_stack``)."""
        stack = _rollback_stack(self.history, self.archived.rollback_stack)
        return stack[-2] if len(stack) >= 2 else None

    def archiving(self, now: datetime) -> tuple[str, list[HistoryEntry]] | None:
        """(file name under history/, entries) of the chunk due to leave state.json, if one is:
        named by its first entry's generation, which no other entry has (the number of entries
        archived before it for entries written before generations existed)."""
        if len(self.history) < ARCHIVE_AT or now - self.history[HISTORY_CHUNK - 1].when() < ARCHIVE_AFTER:
            return None
        first = self.history[0].generation
        name = f"{first:010d}.json" if first is not None else f"before-generations-{self.archived.entries + 1:010d}.json"
        return name, self.history[:HISTORY_CHUNK]

    def without_oldest(self, entries: list[HistoryEntry]) -> None:
        """Takes ``entries``, the oldest of the history (``archiving``), out of it, keeping what
        they said in ``archived``."""
        a = self.archived
        self.archived = ArchivedHistory(
            entries=a.entries + len(entries), production=entries[-1].production,
            decisions=_count_decisions(entries, a.decisions),
            rollback_stack=_rollback_stack(entries, a.rollback_stack)[-ROLLBACK_DEPTH:],
            newest=max(a.newest, _newest(entries)))
        self.history = self.history[len(entries):]

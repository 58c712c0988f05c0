"""What one retraining job trains and evaluates on (``cluster/core/replay.py`` says why):

- **fresh**: the feedback created after the parent's watermark (the newest record it
  trained on), newest-per-prediction only; the newest ``eval_fraction`` of it is kept back
  for the gate, the rest is trained on;
- **replay**: a label-stratified sample of the seed and of the parent's reservoir (a
  uniform sample of all earlier feedback), ``replay_ratio`` rows per fresh row;
- **golden**: the model's frozen evaluation set, never trained on;
- **held**: fresh rows of keys the quarantine holds (``cluster/core/quarantine.py``), kept
  beside the version until an admin releases the key; then the next job trains on them;
- **transfer**: a distilled student's sample of ``distill.transfer_dataset``, texts without
  labels that only the teacher's soft labels teach.

Driver side, pyarrow. What it reads is the parent's reservoir, the seed and the golden
files, and the feedback partitions from the watermark's day on: bounded by fresh data and
the reservoir, not by how much feedback was ever stored.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tuneloop.core.config import DistillConfig, ModelConfig, QuarantineConfig, TrainingConfig
from tuneloop.core.feedback_stats import superseded
from tuneloop.core.quarantine import ANONYMOUS, flag_keys, normalized, task_key_stats
from tuneloop.core.replay import kept_back, replay_quota, reservoir_update, stratified_sample
from tuneloop.core.tasks import Task
from tuneloop.store.feedback_store import ARRIVAL_ORDER, FeedbackStore
from tuneloop.store.manifest import Manifest
from tuneloop.store.quarantine import QuarantineBook
from tuneloop.store.records import arrow_type
from tuneloop.store.registry import Registry
from tuneloop.store.registry_state import version_number
from tuneloop.training.data import file_sha256, read_dataset, read_texts, table_digest

log = logging.getLogger(__name__)

TS = pa.timestamp("ms", tz="UTC")
TRANSFER = "transfer"  # the source of a student's transfer texts: the teacher's soft labels are all they have
SEED_DIGEST = "tuneloop.seed_sha256"  # in a frozen golden sample's Parquet metadata: the seed it came from
LABELLED_COLUMN = "labelled"  # in a train table with transfer rows: False where a row's targets are placeholders


def row_schema(task: Task) -> pa.Schema:
    """The rows a job handles: text, the task's targets, and where each row came from."""
    return pa.schema([("text", pa.string())]
                     + [(c, arrow_type(task.feedback_columns[c])) for c in task.target_columns]
                     + [("source", pa.string()), ("feedback_id", pa.string()), ("prediction_id", pa.string()),
                        ("key_id", pa.string()), ("created_at", TS)])


def _rows(table: pa.Table, schema: pa.Schema, source: str | None = None) -> pa.Table:
    """``table`` in ``schema``: missing columns null, ``source`` set when given."""
    n = table.num_rows
    columns = {}
    for f in schema:
        if f.name == "source" and source is not None:
            columns[f.name] = pa.array([source] * n, pa.string())
        elif f.name in table.column_names:
            columns[f.name] = table.column(f.name).cast(f.type)
        else:
            columns[f.name] = pa.nulls(n, f.type)
    return pa.table(columns, schema=schema)


def _take(table: pa.Table, indices: list[int]) -> pa.Table:
    return table.take(pa.array(indices, pa.int64()))


def _without_texts(table: pa.Table, texts: set[str]) -> pa.Table:
    if not texts or table.num_rows == 0:
        return table
    keep = [normalized(t) not in texts for t in table.column("text").to_pylist()]
    return table.filter(pa.array(keep))


@dataclass
class JobData:
    train: pa.Table  # row_schema: fresh training rows and the replay sample, shuffled
    golden: pa.Table  # text and targets
    fresh_eval: pa.Table  # row_schema: the newest fresh rows, kept back for the gate
    validation: pa.Table  # row_schema: the fresh rows before those, early stopping's (none if it is off)
    reservoir: pa.Table  # row_schema: the child's uniform sample of all feedback trained on
    held: pa.Table  # row_schema: rows of quarantined keys, waiting for a release
    # The seed's texts users answered (normalized), carried from version to version: their
    # seed rows replay no more.
    answered: pa.Table = field(default_factory=lambda: pa.table({"text": pa.array([], pa.string())}))
    summary: dict[str, Any] = field(default_factory=dict)  # the manifest's ``data``


def golden_labels_missing(task: Task, golden: pa.Table) -> list[str]:
    """The labels (entity types) no row of ``golden`` holds."""
    column = task.target_columns[0]
    values = golden.column(column).to_pylist()
    if column == "label":
        present = set(values)
    elif column == "labels":
        present = {label for row in values for label in row or ()}
    else:  # entities: an NER golden set without any gave the gate an F1 of 0 against 0
        present = {entity["label"] for row in values for entity in row or ()}
    known = getattr(task, "types", task.labels)
    return sorted(set(known) - present)


def _warn_missing_labels(task: Task, golden: pa.Table, source: str = "frozen from the seed") -> None:
    """Say so when the golden set leaves labels out: the gate cannot see a version lose (or
    learn) them there (the frozen sample's for good; a golden_dataset's until the file changes)."""
    missing = golden_labels_missing(task, golden)
    if missing:
        log.warning("the golden set %s has no row of %s: the gate judges those on fresh feedback only (set "
                    "golden_dataset to a file that has them)", source, missing)


def _check_first_labels(task: Task, mcfg: ModelConfig, train: pa.Table) -> None:
    """A first version learns the labels its rows hold, and no other: a classifier whose rows
    hold one class is refused (it answers that class to everything, and the gate, with no
    production to compare, promoted one: a golden file cut from the seed had taken the other
    classes' rows), unless it is a student of a teacher's soft labels; labels (entity types)
    no row holds are said."""
    missing = golden_labels_missing(task, train)
    if not missing:
        return
    # A student learns every class from its teacher's soft labels (alpha above 0), on rows of
    # any label and on transfer texts, and its gate compares it with the teacher: said, not refused.
    learns_from_teacher = mcfg.distill is not None and mcfg.distill.alpha > 0
    if task.target_columns == ("label",) and not learns_from_teacher:
        present = sorted(set(task.labels) - set(missing))
        if len(present) < 2:
            raise ValueError(f"model {mcfg.name!r}: its first version would train on rows of {present} alone "
                             f"({train.num_rows} rows), none of {missing}: a classifier of one class answers it "
                             "to everything. Give it rows of the others: in the seed"
                             + (" (seed rows that are texts of golden_dataset are judged, never trained on)"
                                if mcfg.golden_dataset else "")
                             + ", or as feedback; or raise training.max_rows_per_job, which fresh feedback of one "
                               "class may fill")
    log.warning("model %s: its first version trains on no row of %s: it cannot learn to answer them (add seed "
                "rows of them)", mcfg.name, missing)


def golden_set(task: Task, mcfg: ModelConfig, tcfg: TrainingConfig, registry: Registry,
               seed: pa.Table | None, feedback: pa.Table | None = None,
               trained_on_seed: bool = False, first_version: bool = True) -> tuple[pa.Table, dict[str, Any]]:
    """The golden set: the configured file, or the frozen sample of the seed (taken at the
    model's first job and never changed once a version is published), or none. ``feedback``:
    the stored feedback the first job also reads (its newest share kept back for the gate). A model whose production
    ``trained_on_seed`` and that has no frozen sample (its golden_dataset was taken out of
    the config since) gets none. ``first_version``: the job makes v1, whose early stopping
    takes its own share of the seed."""
    if mcfg.golden_dataset:
        table = read_dataset(mcfg.golden_dataset, task)
        _warn_missing_labels(task, table, f"{mcfg.golden_dataset} (golden_dataset)")
        return table, {"source": mcfg.golden_dataset, "sha256": file_sha256(mcfg.golden_dataset),
                       "rows": table.num_rows}
    frozen, taken_anew, seed_digest = registry.golden(mcfg.name), False, None
    if frozen is not None and first_version and seed is not None and seed.num_rows \
            and not registry.versions(mcfg.name) and _taken_from(frozen) != (seed_digest := table_digest(seed)):
        # A first job that failed (a seed of one class, too few rows) froze a sample of that
        # seed; the seed a user then corrected was never sampled, and the golden set lacked
        # its classes for good.
        log.warning("model %s: its golden set was sampled from another seed by a job that published no version; "
                    "sampled anew from this one", mcfg.name)
        frozen, taken_anew = None, True
    if frozen is None and trained_on_seed and seed is not None and seed.num_rows:
        log.warning("model %s has no golden set, and its production trained on its seed: a sample of the seed "
                    "taken now would hold rows it learned, so none is taken; give the model a golden_dataset",
                    mcfg.name)
    elif frozen is None and seed is not None and seed.num_rows:
        # Each label (entity type, or none at all) keeps a row to train on, the first holding
        # it: a label's only example went to the golden set (every stratum present gets a row
        # there), frozen for good and never trained; a tiny first seed went there whole. One
        # row a label, not a combination: a combination a row kept too many.
        targets = seed.select(list(task.target_columns)).to_pylist()
        strata = [task.stratum(r) for r in targets]
        kept = _first_with_each_label(task, targets)
        # One row a text: every row of a golden text leaves training, so a duplicate of a
        # kept row's text (or a text picked twice) took a class's last training row with it.
        texts = [normalized(t) for t in seed.column("text").to_pylist()]
        taken, eligible = {texts[i] for i in kept}, []
        for i, text in enumerate(texts):
            if text not in taken:
                taken.add(text)
                eligible.append(i)
        size = min(tcfg.golden_max_rows, max(1, round(seed.num_rows * tcfg.golden_fraction)), len(eligible))
        if size > 0:
            picked = [eligible[i] for i in stratified_sample([strata[i] for i in eligible], size,
                                                             random.Random(f"golden:{tcfg.seed}"))]
            golden_texts = {texts[i] for i in picked}
            # What trains: the seed less the golden set and, at v1 with early stopping on, its
            # validation share; the feedback less the share kept back for the gate. Counting
            # those in, a golden set was frozen for good and the job then failed anyway.
            # Feedback as the job counts it: the newest answer per prediction and per text, none
            # on a golden text; a seed text it answers leaves the seed's rows. Counted raw
            # (repeats, answers on seed and golden texts), a golden set was frozen and the job
            # then failed with fewer rows than workers.
            if feedback is not None:  # less the keys the quarantine holds already (from a first job before)
                held = QuarantineBook(registry.storage).quarantined(mcfg.name)
                feedback = feedback.filter(pc.invert(_of_keys(feedback, held))) if held else feedback
            answers = _texts(_latest_answers(feedback)[0]) - golden_texts if feedback is not None else set()
            seed_left = sum(t not in golden_texts and t not in answers for t in texts)
            watching = first_version and tcfg.early_stopping_patience is not None and tcfg.epochs > 1
            validation = min(kept_back(seed_left, tcfg.eval_fraction), tcfg.max_rows_per_job) if watching else 0
            left = seed_left - validation + len(answers) - kept_back(len(answers), tcfg.eval_fraction)
            if left < tcfg.num_workers:  # checked here: the golden set is for good
                raise ValueError(f"model {mcfg.name!r}: a golden set of {size} of the seed's {seed.num_rows} rows "
                                 f"(golden_fraction {tcfg.golden_fraction:g}) leaves {left} to train on"
                                 + (f" ({validation} more watch early stopping)" if validation else "")
                                 + f", fewer than training.num_workers {tcfg.num_workers}: lower either, or add "
                                 "seed rows")
            sample = _take(seed, picked).replace_schema_metadata({SEED_DIGEST: seed_digest or table_digest(seed)})
            frozen = registry.freeze_golden(mcfg.name, sample, replace=taken_anew)
            _warn_missing_labels(task, frozen)
    if frozen is None:
        return pa.table({"text": pa.array([], pa.string())}), {"source": None, "rows": 0}
    return frozen, {"source": "seed sample frozen at the first job", "sha256": table_digest(frozen),
                    "rows": frozen.num_rows}


def _taken_from(golden: pa.Table) -> str | None:
    """The digest of the seed a frozen golden sample was taken from (None: frozen before
    tuneloop noted it)."""
    digest = (golden.schema.metadata or {}).get(SEED_DIGEST.encode())
    return digest.decode() if digest else None


def _quarantine(task: Task, qcfg: QuarantineConfig, book: QuarantineBook, model: str, stored: pa.Table,
                parent: Manifest | None) -> tuple[set[str], dict[str, Any]]:
    """Flag the keys of this job's feedback that are far off the rest, record them in the
    book, and return every key now quarantined with the summary's numbers. Turned off, it
    holds nothing (rows held before train with this job)."""
    if not qcfg.enabled:
        return set(), {"flagged": {}, "quarantined_keys": [], "keys": {}, "enabled": False}
    flags: dict[str, str] = {}
    stats = {}
    if stored.num_rows:
        # Keys held already neither vote on shared texts nor set another key's reference.
        before = book.quarantined(model)
        stats = task_key_stats(task, stored.to_pylist(), before)
        # Accuracy, whatever the gate compares: for every task it is the share of texts answered
        # exactly right, what a key's agreement with production counts (``Task.agrees``). An
        # entity or multi-label F1 runs far above exact agreement on multi-entity texts, and
        # held a lone honest key's feedback.
        reference = parent.metrics.accuracy if parent and parent.metrics else None
        flags = flag_keys(stats, reference, min_rows=qcfg.min_rows, max_gap=qcfg.max_gap,
                          min_shared_texts=qcfg.min_shared_texts, min_peer_agreement=qcfg.min_peer_agreement,
                          held=before)
        released = {k for k, v in book.verdicts(model).items() if v.state == "released"}
        flags = {k: why for k, why in flags.items() if k not in released}  # an admin's release stands
    held_keys = book.quarantine(model, flags, {k: stats[k].as_dict() for k in flags}) if flags \
        else book.quarantined(model)
    return held_keys, {"flagged": flags, "quarantined_keys": sorted(held_keys),
                       "keys": {k: s.as_dict() for k, s in sorted(stats.items())}}


def _latest_answers(table: pa.Table) -> tuple[pa.Table, int]:
    """``table`` with only the newest answer per prediction, and how many it dropped."""
    dropped = superseded(table.select(["feedback_id", "prediction_id", "created_at"]).to_pylist())
    if dropped:
        table = table.filter(pc.invert(pc.is_in(table.column("feedback_id"), pa.array(sorted(dropped)))))
    return table, len(dropped)


def _texts(table: pa.Table) -> set[str]:
    return {normalized(t) for t in table.column("text").to_pylist()}


def _newest_per_text(table: pa.Table) -> tuple[pa.Table, int]:
    """``table`` (in arrival order) with only the newest answer per text (normalized), and
    how many it dropped: two answers on one text in one job both trained, opposite labels
    side by side, and both went into the reservoir, where the older was replayed for good."""
    newest = {normalized(t): i for i, t in enumerate(table.column("text").to_pylist())}
    if len(newest) == table.num_rows:
        return table, 0
    return _take(table, sorted(newest.values())), table.num_rows - len(newest)


def _not_answered_since(table: pa.Table, other: pa.Table) -> pa.Table:
    """``table``'s rows on whose text (normalized) ``other`` holds no answer that arrived after
    them (``ARRIVAL_ORDER``)."""
    if not table.num_rows or not other.num_rows:
        return table
    columns = ["text", "created_at", "feedback_id"]
    both = pa.concat_tables([table.select(columns), other.select(columns)])
    texts = [normalized(t) for t in both.column("text").to_pylist()]
    newest = {}
    for i in pc.sort_indices(both, ARRIVAL_ORDER).to_pylist():
        newest[texts[i]] = i
    return table.filter(pa.array([newest[texts[i]] == i for i in range(table.num_rows)]))


def _among(table: pa.Table, column: str, other: pa.Table) -> pa.Array:
    """Which rows of ``table`` have a ``column`` value that ``other`` has too (nulls never do)."""
    values = other.column(column).combine_chunks().drop_null()
    return pc.fill_null(pc.is_in(table.column(column), values), False)


def _of_keys(table: pa.Table, keys: set[str]) -> pa.Array:
    """Which rows came from one of ``keys`` (rows without a key count as ANONYMOUS)."""
    return pc.is_in(pc.fill_null(table.column("key_id"), ANONYMOUS), pa.array(sorted(keys), pa.string()))


def assemble(task: Task, mcfg: ModelConfig, tcfg: TrainingConfig, registry: Registry, feedback: FeedbackStore,
             parent: Manifest | None, qcfg: QuarantineConfig | None = None,
             teacher: ModelConfig | None = None) -> JobData:
    """A job's data. A distilled student (``teacher``: its teacher's config) is judged on the
    teacher's golden set, so that both are measured on the same rows, and without a seed of
    its own it learns from the teacher's seed texts."""
    schema = row_schema(task)
    # Seeded by the parent and by the versions published since it (rejected ones): a job
    # after a rejected one, with no new feedback (a student whose teacher changed), drew the
    # same replay and transfer sample again.
    since = registry.latest_number(mcfg.name) - (version_number(parent.version) if parent else 0)
    rng = random.Random(f"{tcfg.seed}:{parent.version if parent else 'v0'}" + (f":{since}" if since > 0 else ""))
    seed_path = mcfg.seed_dataset or (teacher.seed_dataset if teacher else None)
    seed = read_dataset(seed_path, task) if seed_path else None
    # Fresh feedback: after the parent's watermark (read first: the first job's golden set
    # counts it among the rows left to train on).
    after = parent.watermark() if parent else None
    # Records a second live writer holds uncompacted (an upgrade's two ingresses) may be older
    # than the newest compacted row; a watermark past them would leave them out of every job.
    # What arrived since the oldest of them waits for the next job. Looked for before the
    # Parquet is read: the other way round, a segment compacted in between was in neither.
    # And after it: one writer's record appended in between, older than another writer's
    # compacted in between too, was in the journal only after the first look, and the
    # watermark passed it.
    pending = feedback.oldest_pending(mcfg.name)
    stored = feedback.read_since(mcfg.name, after)
    pending = min((t for t in (pending, feedback.oldest_pending(mcfg.name)) if t is not None), default=None)
    n_behind_pending = 0
    if pending is not None:
        before = stored.filter(pc.fill_null(pc.less(stored.column("created_at"),  # undated rows: older than all
                                                    pa.scalar(pending, stored.schema.field("created_at").type)), True))
        n_behind_pending, stored = stored.num_rows - before.num_rows, before
        if n_behind_pending:
            log.info("%s: %d feedback records arrived after %s, which another writer has not compacted yet: they "
                     "wait for the next job", mcfg.name, n_behind_pending, pending.isoformat())
    if teacher is None:
        # A production trained by a job with a seed has seen any sample of it; one published by
        # hand (weights from elsewhere) has not, and its first job may still freeze one.
        trained_on_seed = parent is not None and (parent.data or {}).get("seed") is not None
        golden, golden_summary = golden_set(task, mcfg, tcfg, registry, seed, stored, trained_on_seed,
                                            first_version=parent is None)
    else:  # the teacher's, frozen at its first job: never a sample of this model's seed
        golden, golden_summary = golden_set(task, teacher, tcfg, registry, None)
        golden_summary["model"] = teacher.name
    golden_texts = _texts(golden)
    frozen = registry.golden(mcfg.name)
    if frozen is not None and mcfg.golden_dataset:
        # The sample frozen at the first job stays out of training while a golden_dataset
        # judges instead: taken out of the config, the file leaves that sample judging again.
        golden_texts |= _texts(frozen)
    before = ((parent.data or {}).get("golden") or {}) if parent is not None else {}
    if mcfg.golden_dataset and before.get("sha256") and before.get("source") == mcfg.golden_dataset \
            and before["sha256"] != golden_summary.get("sha256"):
        log.warning("%s: golden_dataset %s changed since production was judged on it (sha256 %s, now %s): the "
                    "gate compares the two versions on the new file", mcfg.name, mcfg.golden_dataset,
                    before["sha256"][:12], str(golden_summary.get("sha256"))[:12])

    # The keys the quarantine holds are set aside first (a held key's later answer must not
    # replace another key's), then the newest answer per prediction wins.
    latest = _latest_answers(stored)[0]
    held_keys, quarantine = _quarantine(task, qcfg or QuarantineConfig(), QuarantineBook(registry.storage),
                                        mcfg.name, latest, parent)
    of_held = _of_keys(stored, held_keys)
    fresh, n_superseded = _latest_answers(stored.filter(pc.invert(of_held)))
    fresh, n_same_text = _newest_per_text(_rows(fresh, schema, "feedback"))  # as the reservoir's rows are replaced
    n_superseded += n_same_text
    on_golden = fresh.num_rows
    fresh = _without_texts(fresh, golden_texts)
    on_golden -= fresh.num_rows
    fresh_texts = _texts(fresh)  # newer than any held, reservoir or seed row with one of them

    # Held rows: the parent's, less those of released keys, which train now (unless they lie
    # past the watermark: then they came again above, as fresh rows), plus this job's.
    held = registry.table(mcfg.name, parent.version, "held") if parent else None
    held = _rows(held, schema) if held is not None else schema.empty_table()
    # A held answer that a newer one on its prediction replaced (this window's rows are all
    # newer) is gone for good: released later, it trained over what users said since.
    replaced_since = pc.and_(_among(held, "prediction_id", stored), pc.invert(_among(held, "feedback_id", stored)))
    held = held.filter(pc.invert(replaced_since))
    still_held = _of_keys(held, held_keys)
    released = held.filter(pc.invert(still_held))
    released = released.filter(pc.invert(_among(released, "feedback_id", stored)))
    released = _latest_answers(released.filter(pc.invert(_among(released, "prediction_id", fresh))))[0]
    # Not a golden_dataset's texts (set since they were held), nor fresh ones. In arrival order:
    # the held table is [still held, newly held, waiting], and the waiting rows are older; the
    # newest per text, and the oldest first within the row budget.
    released = _newest_per_text(_without_texts(released.sort_by(ARRIVAL_ORDER), golden_texts | fresh_texts))[0]
    # Nor one older than the reservoir's answer on its text (another key's, given while it was
    # held): both trained side by side, opposite labels, and both went on in the reservoir.
    reservoir = registry.table(mcfg.name, parent.version, "reservoir") if parent else None
    reservoir = _rows(reservoir, schema) if reservoir is not None else schema.empty_table()
    reservoir = _without_texts(reservoir, golden_texts)  # a golden_dataset set since it was sampled
    released = _not_answered_since(released, reservoir.filter(pc.invert(_of_keys(reservoir, held_keys))))
    # Only a held key's answers that are still the latest on their prediction: one another key
    # replaced in this window, held, was released later over the answer this job trained on.
    newly_held = _without_texts(_rows(latest.filter(_of_keys(latest, held_keys)), schema, "feedback"), golden_texts)
    newly_held = newly_held.filter(pc.invert(_among(newly_held, "feedback_id", held)))
    held = pa.concat_tables([held.filter(still_held), newly_held])

    # Time order: [trained | validation | kept back for the gate]. Early stopping watches the
    # validation rows, never the gate's; the next job trains on both (they are past the watermark).
    # Each within max_rows_per_job too: after a backlog of a million rows, a fifth of them was
    # scored twice (candidate and production) for the gate, and every epoch for early stopping.
    n_eval = min(kept_back(fresh.num_rows, tcfg.eval_fraction), tcfg.max_rows_per_job)
    watching = parent is not None and tcfg.early_stopping_patience is not None and tcfg.epochs > 1
    n_val = min(kept_back(fresh.num_rows - n_eval, tcfg.eval_fraction), tcfg.max_rows_per_job) if watching else 0
    n_train = min(fresh.num_rows - n_eval - n_val, tcfg.max_rows_per_job)
    # Released rows train within the row budget too; the rest wait in the held table, where
    # the next job finds them released again.
    n_released = min(released.num_rows, tcfg.max_rows_per_job - n_train)
    released, waiting = released.slice(0, n_released), released.slice(n_released)
    held = pa.concat_tables([held, waiting])
    quarantine.update(held_rows=held.num_rows - waiting.num_rows, released_rows=released.num_rows,
                      released_waiting_rows=waiting.num_rows)
    fresh_train, fresh_eval = fresh.slice(0, n_train), fresh.slice(fresh.num_rows - n_eval)
    validation = fresh.slice(fresh.num_rows - n_eval - n_val, n_val)
    # The newest trained row that has a time (another tool's undated rows come first, and
    # a job of them alone moves no watermark).
    dated = fresh_train.filter(pc.is_valid(fresh_train.column("created_at")))
    if dated.num_rows:
        last = dated.slice(dated.num_rows - 1).to_pylist()[0]
        watermark = {"created_at": last["created_at"].isoformat(), "feedback_id": last["feedback_id"] or ""}
    else:
        watermark = parent.data.get("watermark") if parent else None

    # Replay pool: the seed (less the golden set) and the parent's reservoir, less what
    # fresh feedback on the same prediction replaces.
    replaced = {p for t in (fresh, released) for p in t.column("prediction_id").to_pylist() if p is not None}
    if replaced and reservoir.num_rows:
        reservoir = reservoir.filter(pc.invert(pc.is_in(reservoir.column("prediction_id"), pa.array(sorted(replaced)))))
    # Nor what a newer answer on the same text replaces: feedback given as model + text has no
    # prediction id, and a user's correction of a seed text trained beside the seed's old
    # label, which came back in every job after (and, sampled, took the correction out of
    # the gate's kept-back rows).
    reservoir = _without_texts(reservoir, fresh_texts)  # fresh rows are newer than any there
    # And released ones training now, as above; a held key's row there stays for its release.
    released_texts = _texts(released)
    on_released = pa.array([normalized(t) in released_texts for t in reservoir.column("text").to_pylist()], pa.bool_())
    reservoir = reservoir.filter(pc.or_(pc.invert(on_released), _of_keys(reservoir, held_keys)))
    # A key held since its rows were sampled in replays none of them; they stay in the
    # reservoir, so that an admin's release brings them back.
    replayable = reservoir.filter(pc.invert(_of_keys(reservoir, held_keys))) if held_keys else reservoir
    quarantine["held_replay_rows"] = reservoir.num_rows - replayable.num_rows
    # A seed text users answered, now or in any job before, is theirs: kept from version to
    # version (``answered``), as the reservoir, a sample, forgets most answers.
    earlier = registry.table(mcfg.name, parent.version, "answered") if parent else None
    answered = _texts(earlier) if earlier is not None else set()
    if seed is not None:
        answered |= _texts(seed) & (fresh_texts | _texts(released) | _texts(replayable))
    seed_rows = _rows(seed, schema, "seed") if seed is not None else schema.empty_table()
    if parent is None and mcfg.golden_dataset and seed_rows.num_rows:
        judged = seed_rows.num_rows - _without_texts(seed_rows, golden_texts).num_rows
        if judged:  # a golden file cut from the seed: those rows are the gate's, never trained on
            log.warning("model %s: %d of the seed's %d rows are texts of its golden_dataset: the gate judges "
                        "them, no job trains on them", mcfg.name, judged, seed_rows.num_rows)
    seed_pool = _without_texts(seed_rows, golden_texts | answered)
    pool = pa.concat_tables([seed_pool, _rows(replayable, schema, "replay")])
    if parent is None and tcfg.early_stopping_patience is not None and tcfg.epochs > 1:
        # v1 has no fresh feedback to watch: early stopping watches a stratified share of the
        # seed it would train on. It watched the golden set, which then judged the epoch it
        # had picked (v1's recorded metrics, a student's teacher check). Later jobs replay it.
        validation, pool = _seed_validation(task, pool, tcfg.eval_fraction, tcfg.max_rows_per_job, rng)
    fresh_train = pa.concat_tables([fresh_train, released])  # after the watermark's row: it stays put
    n_new = fresh_train.num_rows
    if parent is None:
        quota = tcfg.max_rows_per_job - n_new  # the first version learns the seed
    elif n_new == 0:
        quota = min(tcfg.max_rows_per_job, pool.num_rows)  # nothing new: a replay-only job
    else:
        quota = replay_quota(n_new, tcfg.replay_ratio, tcfg.max_rows_per_job)
    strata = [task.stratum(r) for r in pool.select(list(task.target_columns)).to_pylist()]
    replay = _take(pool, stratified_sample(strata, quota, rng))
    train = pa.concat_tables([fresh_train, replay])
    if train.num_rows == 0:  # transfer texts alone teach no labels: a job needs some
        if seed is not None and seed.num_rows:
            raise ValueError(f"model {mcfg.name!r}: every row of its seed dataset is in its golden set, which never "
                             "trains, and there is no feedback to train on: give a golden_dataset apart from the "
                             "seed (or leave it out: a sample of the seed is then kept back)")
        if seed is not None:  # a file of a header alone
            raise ValueError(f"model {mcfg.name!r}: its seed dataset {seed_path} has no rows, and there is no "
                             "feedback to train on")
        raise ValueError(f"model {mcfg.name!r} has no seed dataset and no feedback to train on")
    if parent is None:
        _check_first_labels(task, mcfg, train)
    transfer_summary = None
    if teacher is not None and mcfg.distill is not None and mcfg.distill.transfer_dataset:
        judging = golden_texts | _texts(fresh_eval) | _texts(validation)  # the gate's and early stopping's
        transfer, transfer_summary = _transfer_rows(mcfg.distill, schema, judging | _texts(train), rng)
        train = pa.concat_tables([train, transfer])
    train = _take(train, rng.sample(range(train.num_rows), train.num_rows))
    # A text the job trains on is no evidence about the candidate: kept-back and validation
    # rows that repeat one (a frequent query; one text answered on two predictions; a seed
    # text sent again) leave the gate's and early stopping's sets. They are past the
    # watermark, so the next job still trains on them.
    train_texts = _texts(train)
    drawn = fresh_eval.num_rows + validation.num_rows
    fresh_eval, validation = _without_texts(fresh_eval, train_texts), _without_texts(validation, train_texts)
    repeating = drawn - fresh_eval.num_rows - validation.num_rows

    # The child's reservoir: the parent's, with this job's fresh rows sampled in.
    candidates = pa.concat_tables([reservoir, fresh_train])
    seen = int(parent.data.get("reservoir", {}).get("seen", 0)) if parent else 0
    seen = max(seen, reservoir.num_rows)
    kept, seen = reservoir_update(list(range(reservoir.num_rows)), seen,
                                  list(range(reservoir.num_rows, candidates.num_rows)), tcfg.reservoir_size, rng)
    child_reservoir = _take(candidates, sorted(kept))

    summary = {
        "seed": {"path": seed_path, "sha256": file_sha256(seed_path),
                 "rows": seed.num_rows} if seed is not None else None,
        "golden": golden_summary,
        "feedback": {"after": parent.data.get("watermark") if parent else None, "fresh_rows": fresh.num_rows,
                     "superseded": n_superseded, "on_golden_texts": on_golden, "trained_rows": n_train,
                     "validation_rows": validation.num_rows if parent else 0, "kept_back_rows": fresh_eval.num_rows,
                     "kept_back_repeating_training": repeating,
                     "left_for_next_job": fresh.num_rows - n_eval - n_val - n_train,
                     "waiting_for_compaction": n_behind_pending},
        "replay": {"rows": replay.num_rows, "pool_rows": pool.num_rows, "ratio": tcfg.replay_ratio},
        "transfer": transfer_summary,
        # No rows, no source: v1 then watches the golden set, as the training result's ``monitor`` says.
        "validation": {"rows": validation.num_rows,
                       "source": None if not validation.num_rows else "seed" if parent is None else "feedback"},
        "reservoir": {"rows": child_reservoir.num_rows, "seen": seen},
        "quarantine": quarantine,
        "watermark": watermark,
        "train_rows": train.num_rows,
        "eval_rows": golden.num_rows + fresh_eval.num_rows,
    }
    return JobData(train=train, golden=golden, fresh_eval=fresh_eval, validation=validation,
                   reservoir=child_reservoir, held=held, summary=summary,
                   answered=pa.table({"text": pa.array(sorted(answered), pa.string())}))


def _transfer_rows(settings: DistillConfig, schema: pa.Schema, exclude: set[str],
                   rng: random.Random) -> tuple[pa.Table, dict[str, Any]]:
    """A sample of at most ``transfer_rows_per_job`` of the transfer set's texts, each once,
    none of ``exclude`` (normalized: those that judge the student, and those the job trains
    on with a label), as rows of ``source`` transfer with no targets."""
    path = settings.transfer_dataset
    read = read_texts(path)
    seen, pool = set(exclude), []
    for text in read:
        key = normalized(text)
        if key not in seen:
            seen.add(key)
            pool.append(text)
    picked = sorted(rng.sample(range(len(pool)), min(settings.transfer_rows_per_job, len(pool))))
    rows = _rows(pa.table({"text": pa.array([pool[i] for i in picked], pa.string())}), schema, TRANSFER)
    if not rows.num_rows:
        log.warning("distill.transfer_dataset %s adds no texts to this job: %s", path,
                    "it has none" if not read else f"its {len(read)} are all golden, judging or labelled rows' texts")
    return rows, {"path": path, "sha256": file_sha256(path), "texts": len(read), "new_texts": len(pool),
                  "rows": rows.num_rows}


def _first_with_each_label(task: Task, targets: list[dict[str, Any]]) -> set[int]:
    """The index of the first row holding each label (by ``Task.feedback_labels``: a class,
    each of a multi-label row's labels, each entity type, or the row's having none)."""
    first: dict[str, int] = {}
    for i, row in enumerate(targets):
        for label in task.feedback_labels({c: [] if v is None else v for c, v in row.items()}):
            first.setdefault(label, i)
    return set(first.values())


def _first_of_each(strata: list[str]) -> set[int]:
    """The index of each stratum's first row (the row a class keeps to train on)."""
    return set({s: i for i, s in reversed(list(enumerate(strata)))}.values())


def _seed_validation(task: Task, pool: pa.Table, fraction: float, max_rows: int,
                     rng: random.Random) -> tuple[pa.Table, pa.Table]:
    """(validation rows, the pool less them): ``fraction`` of the pool, at most ``max_rows``,
    stratified, never a stratum's first row (each class keeps one to train on)."""
    strata = [task.stratum(r) for r in pool.select(list(task.target_columns)).to_pylist()]
    firsts = _first_of_each(strata)
    eligible = [i for i in range(pool.num_rows) if i not in firsts]
    picked = {eligible[i] for i in stratified_sample([strata[i] for i in eligible],
                                                     min(kept_back(pool.num_rows, fraction), max_rows), rng)}
    return _take(pool, sorted(picked)), _take(pool, [i for i in range(pool.num_rows) if i not in picked])


def with_training_columns(task: Task, table: pa.Table) -> pa.Table:
    """``text`` and the task's training targets (label ids, for a classifier), for the workers.
    A table with transfer rows also has ``LABELLED_COLUMN``, False on those, whose targets
    are placeholders (class 0, no labels) that the loss leaves out."""
    sources = table.column("source").to_pylist() if "source" in table.column_names else []
    labelled = [source != TRANSFER for source in sources] if TRANSFER in sources else None
    known = table if labelled is None else table.filter(pa.array(labelled))
    targets = task.training_targets({c: known.column(c).to_pylist() for c in task.target_columns})
    columns = {"text": table.column("text")}
    for c, t in task.training_columns.items():
        kind = arrow_type(t)
        if labelled is not None:
            values, blank = iter(targets[c]), [] if pa.types.is_list(kind) else 0
            targets[c] = [next(values) if has else blank for has in labelled]
        columns[c] = pa.array(targets[c], kind)
    if labelled is not None:
        columns[LABELLED_COLUMN] = pa.array(labelled, pa.bool_())
    return pa.table(columns)

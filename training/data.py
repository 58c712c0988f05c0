"""Training data files: the formats a seed or golden file may have, how they are read, and
their digests. Driver side, pyarrow: a file is a local path or any URI pyarrow opens
(``s3://bucket/seed.tsv``, ``gs://…``), so a job on any node of a cluster reads the same one."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from tuneloop.core.tasks import Task, has_visible_text
from tuneloop.store.records import arrow_type

log = logging.getLogger(__name__)

SEED_FORMATS = {".tsv", ".csv", ".jsonl", ".parquet"}


def seed_format(path: str) -> str:
    suffix = Path(path.split("?", 1)[0]).suffix.lower()
    if suffix not in SEED_FORMATS:
        raise ValueError(f"dataset {path!r}: unsupported format {suffix!r}; use one of {sorted(SEED_FORMATS)}")
    return suffix


def _open(path: str) -> pa.NativeFile:
    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs.open_input_file(inner)  # random access: Parquet reads its footer first
    return pa.OSFile(path, "rb")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with _open(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_dataset(path: str, task: Task) -> pa.Table:
    """A seed or golden file as ``text`` plus the task's target columns, of the types the
    task's feedback records give them (a classifier's ``label`` is a string even where a
    jsonl file wrote ``1``); a missing column fails naming the file and the columns."""
    fmt = seed_format(path)
    columns = ["text", *task.target_columns]
    types = {"text": pa.string(), **{c: arrow_type(task.feedback_columns[c]) for c in task.target_columns}}
    try:
        read = _read_file(path, fmt, columns, types)
        if not task.reads_rows and isinstance(read, list):
            read = pa.Table.from_pylist(read)
    except (pa.ArrowException, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"dataset {path!r} cannot be read as {fmt[1:]}: {e}") from None
    if task.reads_rows:
        rows = []
        for i, row in enumerate(read if isinstance(read, list) else read.to_pylist()):
            try:
                rows.append(task.dataset_row(row))
            except ValueError as e:
                raise ValueError(f"dataset {path!r}, row {i + 1}: {e}") from None
        return _without_invisible(path, pa.table({c: pa.array([r[c] for r in rows], types[c]) for c in columns}))
    twice = sorted({c for c in columns if read.column_names.count(c) > 1})
    if twice:  # pyarrow's column() raised a KeyError on it, a traceback
        raise ValueError(f"dataset {path!r} has the column(s) {twice} more than once: keep one of each")
    missing = [c for c in columns if c not in read.column_names]
    if missing:
        found = read.column_names
        hint = ("; one column read: a .csv is read comma-separated and a .tsv tab-separated"
                if fmt in (".tsv", ".csv") and len(found) == 1 else "")
        raise ValueError(f"dataset {path!r} has no column(s) {missing}; it needs {columns}, and has "
                         f"{found[:20]}{hint}")
    try:
        table = pa.table({c: _as(read.column(c), types[c]) for c in columns})
    except pa.ArrowException as e:  # a list where a label goes, a struct where text does
        raise ValueError(f"dataset {path!r}: its columns {columns} are not of the types tuneloop reads "
                         f"({', '.join(f'{c}: {read.column(c).type}' for c in columns)}): {e}") from None
    table = _spelled_as_configured(task, table)
    _check_rows(path, task, table)
    _warn_conflicting(path, table)
    return _without_invisible(path, table)


def _spelled_as_configured(task: Task, table: pa.Table) -> pa.Table:
    """The file's string labels as the config spells them where they are the same once in
    Unicode's composed form (NFC), as feedback's are: "très bien" written with a combining
    accent (macOS file names and some editors) was refused as outside the model's labels."""
    for column in task.target_columns:
        if pa.types.is_string(table.column(column).type):
            values = [task.spelled_as_configured(v) for v in table.column(column).to_pylist()]
            table = table.set_column(table.column_names.index(column), column, pa.array(values, pa.string()))
    return table


def _warn_conflicting(path: str, table: pa.Table) -> None:
    """Say so when a text comes with two labels (two annotators, a merge of files): each row
    trains as given, pulling the model both ways, and a golden row of it is wrong either way."""
    if "label" not in table.column_names:
        return
    seen: dict[str, str] = {}
    conflicting: dict[str, None] = {}  # in the order met
    for text, label in zip(table.column("text").to_pylist(), table.column("label").to_pylist(), strict=True):
        if seen.setdefault(text, label) != label:
            conflicting[text] = None
    if conflicting:
        log.warning("dataset %s: %d text(s) come with more than one label (the first: %r); each row trains as "
                    "given", path, len(conflicting), next(iter(conflicting))[:80])


def _without_invisible(path: str, table: pa.Table) -> pa.Table:
    """``table`` less its rows whose text has no visible character (empty, or whitespace,
    control or format characters alone: a CoNLL file's empty sentences), said in a warning:
    they were trained on as they were, while feedback refuses such a text. Left out, not
    refused: a file that trained before still does."""
    visible = [has_visible_text(text) for text in table.column("text").to_pylist()]
    if all(visible):
        return table
    log.warning("dataset %s: %d row(s) with no visible text (the first: row %d) left out: nothing to learn or judge",
                path, visible.count(False), visible.index(False) + 1)
    return table.filter(pa.array(visible))


def read_texts(path: str) -> list[str]:
    """A transfer set's texts: the ``text`` column of a file in any format a seed may have
    (other columns, labels among them, are not read); empty and missing texts are left out."""
    fmt = seed_format(path)
    try:
        if fmt == ".parquet":  # the text column alone: a transfer set is large, and may hold more
            with _open(path) as f:
                names = pq.read_schema(f).names
                read = pq.read_table(f, columns=["text"]) if "text" in names else pa.table({n: [] for n in names})
        else:
            read = _read_file(path, fmt, ["text"], {"text": pa.string()})
    except (pa.ArrowException, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"dataset {path!r} cannot be read as {fmt[1:]}: {e}") from None
    if isinstance(read, list):
        texts = [row.get("text") for row in read]
    elif "text" not in read.column_names:
        raise ValueError(f"dataset {path!r} has no column 'text'; it has {read.column_names[:20]}")
    else:
        texts = _as(read.column("text"), pa.string()).to_pylist()
    return [t for t in texts if isinstance(t, str) and t.strip()]


def _read_file(path: str, fmt: str, columns: list[str], types: dict[str, pa.DataType]) -> pa.Table | list[dict]:
    """The file as a table, or, for a jsonl file pyarrow refuses, as its rows."""
    if fmt in (".tsv", ".csv"):
        # TSV as IANA defines it: no quoting, a '"' is text (tweets and reviews open with one);
        # a file with quoted fields is a CSV.
        # A quoted CSV field may hold line breaks (reviews exported by pandas or a spreadsheet);
        # without newlines_in_values pyarrow splits such a file into blocks at a line break
        # inside a field and fails files over its 1 MB block.
        tsv = fmt == ".tsv"
        parse = pacsv.ParseOptions(delimiter="\t" if tsv else ",", quote_char=False if tsv else '"',
                                   newlines_in_values=not tsv)
        with _open(path) as f:
            return pacsv.read_csv(f, parse_options=parse,
                                  convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}))
    if fmt == ".jsonl":
        return _read_jsonl(path, columns, [c for c in columns if pa.types.is_string(types[c])])
    with _open(path) as f:
        return pq.read_table(f)


def _check_rows(path: str, task: Task, table: pa.Table) -> None:
    """Fail on a row the model cannot learn before anything is made of the file: the golden
    set frozen from a seed is kept for good, so a bad label frozen in it failed every later job."""
    for column in ("text", *task.target_columns):
        nulls = table.column(column).null_count
        if nulls:
            first = table.column(column).is_null().to_pylist().index(True)
            raise ValueError(f"dataset {path!r}, row {first + 1}: no {column!r} ({nulls} such row(s))")
        if pa.types.is_string(table.column(column).type) and column != "text":  # an empty TSV cell: no label either
            blank = [not str(v).strip() for v in table.column(column).to_pylist()]
            if any(blank):
                raise ValueError(f"dataset {path!r}, row {blank.index(True) + 1}: an empty {column!r} "
                                 f"({blank.count(True)} such row(s))")
    try:
        task.training_targets({c: table.column(c).to_pylist() for c in task.target_columns})
    except ValueError as e:
        raise ValueError(f"dataset {path!r}: {e}") from None


# Keys a task may read from a row besides its columns: CoNLL's layout for token classification.
_ROW_KEYS = ("tokens", "tags")


def _read_jsonl(path: str, columns: list[str], string_columns: list[str]) -> pa.Table | list[dict]:
    """pyarrow's reader, or, where it refuses a column whose values change type (a label
    written ``1`` in one row and ``"positive"`` in the next, labels as a list in one row and
    joined by "|" in the next), the rows one by one with those columns' numbers as strings,
    and only the keys tuneloop reads (another key whose type changes, an ``id`` or a
    ``meta``, failed the whole file). The rows one by one too where pyarrow took a column
    tuneloop reads for dates: it does so when every value of a block is an ISO date, and
    the text "2024-01-01" trained as "2024-01-01 00:00:00"."""
    try:
        with _open(path) as f:
            table = pajson.read_json(f)
        if not any(_temporal(table.schema.field(c).type) for c in (*columns, *_ROW_KEYS) if c in table.column_names):
            return table
    except pa.ArrowInvalid:
        pass
    with _open(path) as f:
        # Split at "\n" only: splitlines() also splits at U+2028, U+2029 and U+0085, which a
        # JSON string may hold unescaped.
        lines = [line.removesuffix("\r") for line in f.read().decode("utf-8-sig").split("\n")]
    keep = (*columns, *_ROW_KEYS)
    rows = []
    for n, line in enumerate(lines, 1):  # n: the file's line, blank lines counted
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:  # its own "line 1 column 13" is the line's, not the file's
            raise ValueError(f"dataset {path!r}, line {n}: not JSON ({e.msg} at column {e.colno}): "
                             f"{line[:80]!r}") from None
        if not isinstance(row, dict):
            raise ValueError(f"dataset {path!r}, line {n}: a row must be a JSON object, got {line[:80]!r}")
        rows.append({k: row[k] for k in keep if k in row})
    for row in rows:
        for c in string_columns:
            if isinstance(row.get(c), bool):
                row[c] = str(row[c]).lower()
            elif isinstance(row.get(c), int | float):  # 1.0 as "1", as pyarrow's reader casts it
                value = row[c]
                row[c] = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    return rows


def _temporal(dtype: pa.DataType) -> bool:
    """A date or time type, or a list or struct holding one (CoNLL's tokens)."""
    if pa.types.is_temporal(dtype):
        return True
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return _temporal(dtype.value_type)
    return pa.types.is_struct(dtype) and any(_temporal(dtype.field(i).type) for i in range(dtype.num_fields))


def _as(column: pa.ChunkedArray, to: pa.DataType) -> pa.ChunkedArray:
    if pa.types.is_string(to) and pa.types.is_boolean(column.type):
        return pa.chunked_array([pa.array([None if v is None else str(v).lower() for v in column.to_pylist()])])
    return column.cast(to)


def table_digest(table: pa.Table) -> str:
    """A digest of a table's rows, stable across files and Parquet versions."""
    h = hashlib.sha256()
    for row in table.to_pylist():
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()

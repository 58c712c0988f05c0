"""Training data rules: which rows are held out, and how labels become ids. Pure."""

from __future__ import annotations

import hashlib
from pathlib import Path

SEED_FORMATS = {".tsv", ".csv", ".jsonl", ".parquet"}


def is_held_out(text: str, eval_fraction: float) -> bool:
    """Stable split by the text's hash: a text is held out in every job or in none.

    That keeps the gate honest (candidate and production score on rows neither trained on)
    and keeps repeated feedback on one text from leaking between the splits.
    """
    digest = hashlib.blake2b(text.strip().lower().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < eval_fraction


def seed_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SEED_FORMATS:
        raise ValueError(f"seed dataset {path!r}: unsupported format {suffix!r}; use one of {sorted(SEED_FORMATS)}")
    return suffix


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

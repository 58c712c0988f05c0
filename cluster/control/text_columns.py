"""Left-aligned columns for the CLI's tables (`tuneloop jobs`, `tuneloop feedback stats` and
`keys`): two spaces apart, each as wide as its widest cell, no trailing blanks."""

from __future__ import annotations


def columns(rows: list[tuple[str, ...]], indent: str = "") -> list[str]:
    """``rows`` (the first a header) as lines of aligned cells."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))).rstrip()
            for row in rows]

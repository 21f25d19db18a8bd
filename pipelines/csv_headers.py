"""CSV headers read on the driver, so that a file naming the declared columns in another order is read by name.

Spark's CSV reader matches columns by position, and with `enforceSchema=false` refuses a header that names them in
another order. Here each file's header (its first line that is not blank, decompressed as Spark does for .gz and
.bz2, decoded as `source.encoding`) is read, and the files are grouped by the order in which it names the declared
columns; each group is read with the schema in its order. A header that is no reordering of the declared columns (a
column renamed, missing or extra) is left to Spark's check, whose refusal names the file (`pipelines.file_refusals`).
"""
from __future__ import annotations

import csv
import re
import zlib
from pathlib import Path

from jobs.config import FileSource
from pipelines.file_refusals import DECOMPRESSED_BY_NAME, DECOMPRESSORS

_BLANK = re.compile(r"[\x00-\x20]*")  # what Java's String.trim() removes: Spark skips such lines, the header's too


def column_orders(files: list[Path], source: FileSource) -> dict[tuple[str, ...], list[Path]]:
    """The declared column names in the order each of `files` holds them -> those files (in `files` order); a file
    without a header, or whose header is no reordering of them (ignoring case), under the declared order."""
    declared = tuple(c.name for c in source.columns)
    by_name = {name.lower(): name for name in declared}  # names compared ignoring case, as Spark's header check does
    groups: dict[tuple[str, ...], list[Path]] = {}
    for path in files:
        names = [name.lower() for name in _header_names(path, source) or []] if source.header else []
        reordered = len(by_name) == len(declared) and sorted(names) == sorted(by_name)
        groups.setdefault(tuple(by_name[name] for name in names) if reordered else declared, []).append(path)
    return groups


def _header_names(path: Path, source: FileSource) -> list[str] | None:
    """The column names in the header of the CSV file `path`, split as `source` (delimiter, escape) says; None when
    it cannot be read here (compressed in a way only Hadoop reads, cut short, no line that is not blank)."""
    if path.suffix in DECOMPRESSED_BY_NAME and path.suffix not in DECOMPRESSORS:
        return None
    opener = DECOMPRESSORS.get(path.suffix, open)
    escape = None if source.escape == '"' else source.escape  # '"': doubled quotes, which csv reads by default
    try:
        with opener(path, "rt", encoding=source.encoding, errors="replace", newline="") as text:
            lines = (line for line in text if not _BLANK.fullmatch(line))
            return next(csv.reader(lines, delimiter=source.delimiter, escapechar=escape), None)
    except (OSError, EOFError, zlib.error, csv.Error):  # Spark's own read then refuses the file, naming it
        return None

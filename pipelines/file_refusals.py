"""Spark's refusals of a whole input file, as DataErrors that name the file and what is wrong with it.

A CSV header unlike the declared columns, a Parquet column stored in another type than in the other files, a file
that is not Parquet at all, a compressed file cut short: Spark fails the task that reads the file, and the job
would end in a JVM stack trace. `file_refusals_named` turns them into one line for the operator.
"""
from __future__ import annotations

import bz2
import gzip
import re
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import unquote, urlparse

from pipelines.errors import DataError

_HEADER = "the header does not match the declared columns (source.columns, in order)"
_NAMED = (  # (what Spark says, naming the file; what dlpipe says)
    (re.compile(r"Expected: (?P<expected>.*) but found: (?P<found>.*)\nCSV file: (?P<file>\S+)"),
     "CSV file {file}: " + _HEADER + ": expected the column '{expected}' where it has '{found}'"),
    (re.compile(r"Header length: 1, schema size: (?P<expected>\d+)\s*\nCSV file: (?P<file>\S+)"),
     "CSV file {file}: " + _HEADER + ": it has 1 column, the declared schema {expected}: is its delimiter "
     "source.delimiter?"),
    (re.compile(r"Header length: (?P<found>\d+), schema size: (?P<expected>\d+)\s*\nCSV file: (?P<file>\S+)"),
     "CSV file {file}: " + _HEADER + ": it has {found} columns, the declared schema {expected}"),
    (re.compile(r"Parquet column cannot be converted in file (?P<file>\S+)\. "
                r"Column: \[(?P<column>[^]]*)\], Expected: (?P<expected>\S+), Found: (?P<found>\w+)"),
     "Parquet file {file}: column '{column}' is stored as {found}, where the schema Spark took from another file of "
     "the source has {expected}: every file must store a column in one type"),
    (re.compile(r"(?P<file>\S+) is not a Parquet file\. (?P<detail>[^\n]*)"),
     "Parquet file {file}: not a Parquet file ({detail})"),
)
_CUT_SHORT = "Unexpected end of input stream"  # Hadoop's decompressors; Spark does not name the file
_DECOMPRESSED = {".gz": gzip.open, ".bz2": bz2.open}


def _cut_short(path: Path) -> bool:
    """True when a gzip or bzip2 file ends before its compressed stream does, or cannot be read to its end."""
    try:
        with _DECOMPRESSED[path.suffix](path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error):  # cut short; or damaged (a bad header or checksum)
        return True
    return False


def refusal(spark_says: str, files: Sequence[Path]) -> str | None:
    """What is wrong with which of `files`, from the text of Spark's error; None when it is no whole-file refusal."""
    for pattern, problem in _NAMED:
        found = pattern.search(spark_says)
        if found:
            return problem.format(**{**found.groupdict(), "file": unquote(urlparse(found["file"]).path)})
    if _CUT_SHORT not in spark_says:
        return None
    cut = [str(f) for f in files if f.suffix in _DECOMPRESSED and _cut_short(f)]  # on the failure path only
    if cut:
        return f"compressed file(s) {', '.join(cut)}: cut short or damaged, not readable to the end ({_CUT_SHORT})"
    return (f"a compressed input file is cut short ({_CUT_SHORT}); Spark does not say which, and no .gz or .bz2 "
            f"file of the source is: check its other compressed files")


@contextmanager
def file_refusals_named(files: Sequence[Path] = ()) -> Iterator[None]:
    """Around Spark's passes over input files: its refusal of a whole file raised as a DataError naming it (`files`:
    the compressed ones among them are checked when Spark says one is cut short without naming it)."""
    try:
        yield
    except Exception as exc:
        problem = refusal(_text(exc), files)
        if problem is None:
            raise
        raise DataError(problem) from None


def _text(exc: Exception) -> str:
    """The error's text; empty if it cannot be had (a Py4JJavaError asks the JVM for it: gone once Spark stopped)."""
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - the original error is what the caller re-raises
        return ""

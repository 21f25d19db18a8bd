"""Refusals of a whole input file, as DataErrors that name the file and what is wrong with it.

A CSV header unlike the declared columns, a Parquet column stored in another type than in the other files, a file
that is not Parquet at all, a compressed file cut short: Spark fails the task that reads the file, and the job
would end in a JVM stack trace. `file_refusals_named` turns them into one line for the operator. A file that is not
text at all (a zip, a workbook) is refused before Spark reads it (`refuse_files_not_text`).
"""
from __future__ import annotations

import bz2
import codecs
import gzip
import re
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import unquote, urlparse

from pipelines.errors import DataError

_HEADER = "the header does not name the declared columns (source.columns, in any order)"
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
# Files a text source (CSV, JSON Lines) cannot read, known by their first bytes: Spark would read them as lines of
# binary noise, and the first complaint would be about the header or every line. Hadoop decompresses by file name,
# so a compressed stream is refused only without such a name.
_NOT_TEXT = (
    (b"PK\x03\x04", "a zip archive (an Excel .xlsx workbook is one too)"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an Office document (e.g. an Excel .xls workbook)"),
    (b"PAR1", "a Parquet file (source.kind parquet reads Parquet)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"\x1f\x8b", "gzip-compressed without the .gz name Spark decompresses by"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
)
DECOMPRESSED_BY_NAME = (".gz", ".bz2", ".deflate", ".lz4", ".snappy", ".zst")
_UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")  # little- and big-endian byte-order marks
_CUT_SHORT = "Unexpected end of input stream"  # Hadoop's decompressors; Spark does not name the file
DECOMPRESSORS = {".gz": gzip.open, ".bz2": bz2.open}  # the ones Python reads too


def _cut_short(path: Path) -> bool:
    """True when a gzip or bzip2 file ends before its compressed stream does, or cannot be read to its end."""
    try:
        with DECOMPRESSORS[path.suffix](path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error):  # cut short; or damaged (a bad header or checksum)
        return True
    return False


def refuse_files_not_text(files: Sequence[Path], what: str, encoding: str = "UTF-8") -> None:
    """DataError naming the first of a text source's `files` whose first bytes say it is not text (an archive, a
    workbook, Parquet, a compressed stream without its name), or is UTF-16 text read as another `encoding` (Excel's
    "Unicode text"); `what` names the source's format."""
    for path in files:
        if path.suffix in DECOMPRESSED_BY_NAME:
            continue
        with open(path, "rb") as stream:
            head = stream.read(8)
        kind = next((kind for start, kind in _NOT_TEXT if head.startswith(start)), None)
        if kind:
            raise DataError(f"{what} file {path}: {kind}, not text; a {what} source reads text files, plain or "
                            f"compressed as .gz or .bz2")
        if head.startswith(_UTF16_MARKS) and not codecs.lookup(encoding).name.startswith("utf-16"):
            how = ("set source.encoding: UTF-16 and source.multiline: true" if what == "CSV"
                   else f"a {what} source reads UTF-8: convert it")
            raise DataError(f"{what} file {path}: UTF-16 text (it starts with a UTF-16 byte-order mark), read as "
                            f"{encoding}; {how}")


def refusal(spark_says: str, files: Sequence[Path]) -> str | None:
    """What is wrong with which of `files`, from the text of Spark's error; None when it is no whole-file refusal."""
    for pattern, problem in _NAMED:
        found = pattern.search(spark_says)
        if found:
            return problem.format(**{**found.groupdict(), "file": unquote(urlparse(found["file"]).path)})
    if _CUT_SHORT not in spark_says:
        return None
    cut = [str(f) for f in files if f.suffix in DECOMPRESSORS and _cut_short(f)]  # on the failure path only
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

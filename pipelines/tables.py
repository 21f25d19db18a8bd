"""Table ingest (CSV, JSON Lines, Parquet): every record checked against the declared columns, or a reason.

Shared by every file source with declared columns (tables, time series, text).

CSV numbers (float, double) and strings are parsed by Spark's CSV reader; other columns, and every JSON value, are
read as text and cast here. Spark's PERMISSIVE mode keeps a line it cannot parse in `_corrupt_record`; such a CSV
line is split again as text, so a bad value gets a reason naming its column and problem either way.
Reasons name the column and the kind of problem, never the value (the value is in `record`), so they group.
"""
from __future__ import annotations

import logging
import math
from contextlib import ExitStack, contextmanager
from functools import reduce
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from py4j.protocol import Py4JError
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, FloatType, StringType, StructField, StructType

from jobs.config import ColumnSpec, ConfigError, FileSource, TableSource
from pipelines import sql_text as sql
from pipelines.caching import kept_as_parquet, materialized
from pipelines.csv_headers import column_orders
from pipelines.errors import DataError
from pipelines.file_refusals import file_refusals_named, refuse_files_not_text
from pipelines.quarantine import is_quarantined
from pipelines.spark import small_generated_methods
from pipelines.spark_progress import spark_step

CORRUPT_RECORD = "_corrupt_record"
_LINE = "_line"  # JSON Lines: the line a row was parsed from, its record when quarantined
NUMERIC_TYPES = ("int", "long", "float", "double")
DUPLICATE_KEY = "duplicate key: an earlier row has the same key (first kept)"
SHOWN_REPEATS = 3  # repeats named when duplicates fail the job
log = logging.getLogger("dlpipe.etl")
_INTEGER_TEXT = r"^\s*[+-]?\d+\s*$"  # Spark's cast truncates "1.5" to 1; an int column must hold an integer
_BLANK_LINE = r"^[\x00-\x20]*$"  # what Java's String.trim() removes: CSV skips such lines
# CSV columns of these types are parsed by the reader itself: 27 s for 10M rows of 20 doubles, against 41 s read as
# text and cast (BENCHMARKS.md, ETL notes). Integers stay text, checked against _INTEGER_TEXT: Java's integer
# parsing would also accept non-ASCII digits.
_PARSED_BY_CSV_READER = {"float": FloatType(), "double": DoubleType(), "string": StringType()}
_REREAD = "_reread"  # a CSV line the reader flagged, split again with every column as text
# what a reader puts in place of bytes its encoding cannot decode: text holding it was not read as written
REPLACEMENT_CHARACTER = "\ufffd"
UNDECODABLE = "bytes the encoding cannot decode (see source.encoding)"


def source_files(path: Path) -> list[Path]:
    """The input files of a source: `path` itself, or the visible files below it (as Spark lists them), sorted."""
    root = Path(path).resolve()
    if not root.exists():
        raise DataError(f"source {root} does not exist (source.path: {path})")
    hidden = lambda p: any(part.startswith((".", "_")) for part in p.relative_to(root).parts)  # noqa: E731
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not hidden(p))
    if not files:
        raise DataError(f"source folder {root} contains no files (source.path: {path})")
    return files


def malformed_reason(kind: str, columns: int) -> str:
    """The reason for a line the reader could not split into the declared columns."""
    what = "a CSV line with" if kind == "csv" else "a JSON object of"
    return f"malformed record: not {what} {columns} columns"


UNCLOSED_QUOTE_HINT = (" (a quoted value is not closed on its line: `source.multiline: true` reads values spanning "
                       "lines)")


def _parsed_by_reader(source: FileSource) -> set[str]:
    """The declared columns the reader returns in their declared type (the others are read as text and cast)."""
    if source.file_format != "csv":
        return set()
    return {c.name for c in source.columns if c.type in _PARSED_BY_CSV_READER}


def _as_text(names: list[str]) -> StructType:
    """The columns `names` as text, and the corrupt-record column."""
    return StructType([StructField(name, StringType()) for name in names]).add(CORRUPT_RECORD, StringType())


def _ddl(schema: StructType) -> str:
    return ", ".join(f"`{f.name.replace('`', '``')}` {f.dataType.simpleString()}" for f in schema)


def _check_parquet_columns(source: FileSource, files: list[Path]) -> None:
    """DataError naming a Parquet file that lacks a declared column. Spark takes the schema from one file and reads
    a column another file lacks as null, which a nullable column's checks would let through unseen. Only footers are
    read; a file that is not Parquet at all is left to Spark, whose refusal names it (`file_refusals_named`)."""
    for path in files:
        try:
            names = set(pq.read_schema(path).names)
        except pa.ArrowInvalid:
            continue
        missing = [c.name for c in source.columns if c.name not in names]
        if missing:
            raise DataError(f"Parquet file {path} lacks the declared column(s) {', '.join(missing)} (source.columns)")


def _check_java_knows(spark: SparkSession, encoding: str) -> None:
    """ConfigError unless the JVM, which decodes the CSV, knows `encoding` (the config checks it against Python's
    codecs, which also know names such as utf-8-sig or latin_1 that Java does not)."""
    charset = spark.sparkContext._jvm.java.nio.charset.Charset
    try:
        known = charset.isSupported(encoding)
    except Py4JError:  # IllegalCharsetNameException
        known = False
    if not known:
        raise ConfigError(f"source.encoding {encoding!r} is not a charset name Java knows (e.g. UTF-8, ISO-8859-1, "
                          f"windows-1252, UTF-16)")


def _read(spark: SparkSession, source: FileSource, files: list[Path]) -> DataFrame:
    paths = [str(f) for f in files]
    if source.file_format == "parquet":
        _check_parquet_columns(source, files)
        return spark.read.parquet(*paths).withColumn(CORRUPT_RECORD, F.lit(None).cast("string"))
    refuse_files_not_text(files, "CSV" if source.file_format == "csv" else "JSON Lines", source.encoding)
    if source.file_format == "json":
        return _read_json_lines(spark, _as_text([c.name for c in source.columns]), paths)
    _check_java_knows(spark, source.encoding)
    return reduce(DataFrame.unionByName, [_read_csv(spark, source, order, group)
                                          for order, group in column_orders(files, source).items()])


def _read_csv(spark: SparkSession, source: FileSource, order: tuple[str, ...], files: list[Path]) -> DataFrame:
    """The CSV `files`, which hold the declared columns in `order`: the declared columns (in declared order),
    `_corrupt_record`, and `_reread`: a flagged line split again as text (null for the others)."""
    parsed, declared = _parsed_by_reader(source), {c.name: c.type for c in source.columns}
    schema = StructType([StructField(name, _PARSED_BY_CSV_READER[declared[name]] if name in parsed else StringType())
                         for name in order]).add(CORRUPT_RECORD, StringType())
    reader = spark.read.schema(schema).options(mode="PERMISSIVE", columnNameOfCorruptRecord=CORRUPT_RECORD)
    rows = reader.csv([str(f) for f in files], header=source.header, sep=source.delimiter, escape=source.escape,
                      encoding=source.encoding, multiLine=source.multiline, enforceSchema=False)
    # The reader flags a line it cannot split into the declared columns, or whose value it cannot parse; such a
    # line (rare) is split again as text, to tell the two apart and check its values one by one.
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT_RECORD, "sep": source.delimiter,
               "escape": source.escape}
    flagged = F.col(CORRUPT_RECORD)
    reread = F.when(flagged.isNotNull(), F.from_csv(flagged, _ddl(_as_text(list(order))), options))
    return rows.select(*[sql.column(name) for name in declared], flagged, reread.alias(_REREAD))


def _read_json_lines(spark: SparkSession, text: StructType, paths: list[str]) -> DataFrame:
    """One row per non-blank line; a line that is not one JSON object (an array too) keeps its text in `_corrupt_record`.

    Spark's JSON reader turns a top-level array into one row per element (none for `[]`), so lines are read as
    text and parsed here. Spark's parser also stops after the first value of a line, so a line holding more (two
    objects whose newline was lost, trailing garbage) is found by counting the elements of `[<line>,0]`: exactly
    two when the line is one value. Blank lines (whitespace and control characters only) are not records, as for CSV.
    Every row keeps its line (`_LINE`): a quarantined row's record is the line as written.
    """
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT_RECORD}
    lines = spark.read.text(paths).where(~F.col("value").rlike(_BLANK_LINE))
    parsed = lines.select(F.from_json("value", text, options).alias("row"), F.col("value"))
    one_value = F.coalesce(F.json_array_length(F.concat(F.lit("["), F.col("value"), F.lit(",0]"))) == 2, F.lit(False))
    corrupt = F.col(f"row.{CORRUPT_RECORD}").isNotNull() | F.col("row").isNull() | ~one_value
    return parsed.select(*[F.col(f"row.{c.name}").alias(c.name) for c in text.fields if c.name != CORRUPT_RECORD],
                         F.when(corrupt, F.col("value")).alias(CORRUPT_RECORD), F.col("value").alias(_LINE))


def _value_problem(spec: ColumnSpec, raw: str, typed: str, required: bool) -> str:
    """Why this column's value keeps its row out (null when it is fine), as SQL text; the first problem found wins.

    `raw` is the value as read (text, or already in its type when the reader parsed it), `typed` the value in the
    declared type (computed once, in an earlier projection).
    """
    where = f"column '{spec.name}'"
    problems = [(f"{raw} IS NULL", sql.literal(f"{where}: missing required value" if required else None))]
    wrong_type = f"{typed} IS NULL"
    if spec.type in ("int", "long"):
        wrong_type += f" OR NOT (CAST({raw} AS STRING) RLIKE {sql.literal(_INTEGER_TEXT)})"
    pattern = f" (format {spec.format})" if spec.format else ""
    problems.append((wrong_type, sql.literal(f"{where}: not a valid {spec.type}{pattern}")))
    if spec.type in ("float", "double"):
        problems.append((f"isnan({typed}) OR abs({typed}) = {sql.literal(math.inf)}",
                         sql.literal(f"{where}: NaN or infinite")))
    if spec.min is not None:
        problems.append((f"{typed} < {sql.literal(spec.min)}", sql.literal(f"{where}: below the minimum {spec.min:g}")))
    if spec.max is not None:
        problems.append((f"{typed} > {sql.literal(spec.max)}", sql.literal(f"{where}: above the maximum {spec.max:g}")))
    if spec.type == "string" and spec.allowed is None:  # (an allowed value holds no such character)
        problems.append((f"contains({typed}, {sql.literal(REPLACEMENT_CHARACTER)})",
                         sql.literal(f"{where}: {UNDECODABLE}")))
    if spec.allowed is not None:
        allowed = ", ".join(str(v) for v in spec.allowed)
        problems.append((f"NOT ({typed} IN ({', '.join(sql.literal(v) for v in spec.allowed)}))",
                         sql.literal(f"{where}: not one of the allowed values [{allowed}]")))
    return sql.case(*problems)


def required_columns(source: FileSource) -> set[str]:
    """The declared columns a clean row always has a value in: the non-nullable ones and the key columns."""
    return {c.name for c in source.columns if not c.nullable or c.name in source.key_columns}


def _joined(problems: list[str]) -> str:
    """The problems found joined by '; ', or null (SQL text). A problem is never empty text, so the joined text is
    empty exactly when there is none: each problem is written once, which halves the expression Spark compiles."""
    return sql.call("nullif", sql.call("concat_ws", "'; '", *problems), "''")


def _row_reason(source: FileSource) -> str:
    """The row's reason: malformed, or the reasons of its columns joined by '; ' (null for a clean row), as SQL text.

    Reads the `_raw_<name>` and typed `<name>` columns; a CSV line the reader flagged is checked on its
    re-split text instead.
    """
    required = required_columns(source)
    malformed = malformed_reason(source.file_format, len(source.columns))
    as_read = _joined([_value_problem(c, sql.name(_raw(c.name)), sql.name(c.name), c.name in required)
                       for c in source.columns])
    flagged = f"{sql.name(CORRUPT_RECORD)} IS NOT NULL"
    if source.file_format != "csv":
        return sql.case((flagged, sql.literal(malformed)), otherwise=as_read)
    as_text = _joined([_value_problem(c, sql.name(_REREAD, c.name), _cast(c, sql.name(_REREAD, c.name)),
                                      c.name in required) for c in source.columns])
    malformed_line = sql.literal(malformed)
    if not source.multiline:  # an odd number of quotes: a value that goes on in the next line(s)
        unclosed = f"length(regexp_replace({sql.name(CORRUPT_RECORD)}, '[^\"]', '')) % 2 = 1"
        malformed_line = sql.case((unclosed, sql.literal(malformed + UNCLOSED_QUOTE_HINT)), otherwise=malformed_line)
    # A flagged line always has a reason: the reader could not read it into the declared types.
    return sql.case((f"NOT ({flagged})", as_read),
                    (f"{sql.name(_REREAD, CORRUPT_RECORD)} IS NOT NULL", malformed_line),
                    otherwise=sql.call("coalesce", as_text, malformed_line))


def _record(source: FileSource) -> str:
    """What was read, for a quarantined row (SQL text): a JSON line as written, otherwise `_values_record`."""
    return sql.name(_LINE) if source.file_format == "json" else _values_record(source)


def _values_record(source: FileSource) -> str:
    """The row as read, as SQL text: a malformed line as it is, otherwise its values as JSON text (what a keyless
    row's hash covers, so a JSON line's spacing and key order do not change its key)."""
    parsed = _parsed_by_reader(source)
    as_read = sql.json_object({c.name: f"CAST({sql.name(_raw(c.name))} AS STRING)" if c.name in parsed
                               else sql.name(_raw(c.name)) for c in source.columns})
    corrupt = sql.name(CORRUPT_RECORD)
    if source.file_format != "csv":
        return sql.call("coalesce", corrupt, as_read)
    as_text = sql.json_object({c.name: sql.name(_REREAD, c.name) for c in source.columns})
    return sql.case((f"{corrupt} IS NULL", as_read), (f"{sql.name(_REREAD, CORRUPT_RECORD)} IS NULL", as_text),
                    otherwise=corrupt)


def _typed(spec: ColumnSpec, parsed: set[str]) -> str:
    """A declared column in its type (SQL text): as the reader parsed it, or cast from text.

    On a CSV line the reader flagged, a value it could not parse is null here; such a line is always quarantined
    (`_row_reason`), so its typed values go nowhere.
    """
    return sql.name(spec.name) if spec.name in parsed else _cast(spec, sql.name(spec.name))


def _cast(spec: ColumnSpec, value: str) -> str:
    """`value` (text) in the declared type, null where it is not one; a date or time read with the column's format
    (SQL text)."""
    if spec.format is not None:
        return sql.call("to_date" if spec.type == "date" else "to_timestamp", value, sql.literal(spec.format))
    return f"CAST({value} AS {spec.type})"


def _raw(name: str) -> str:
    """The column holding a declared column's value as read, next to its typed cast."""
    return f"_raw_{name}"


def _row_key(source: FileSource, record: str) -> str:
    """The row key (SQL text): the typed key column(s) as text joined by '|', or a hash of the whole record."""
    if not source.key_columns:
        return sql.call("sha2", record, "256")
    return sql.call("concat_ws", "'|'", *[f"CAST({sql.name(n)} AS STRING)" for n in source.key_columns])


def ingest_table(spark: SparkSession, source: FileSource, files: list[Path],
                 check: Callable[[DataFrame], DataFrame] | None = None) -> DataFrame:
    """One row per input record: `source_file`, `position`, `id` (the key), `record`, `reason` and the other
    columns, typed. `check` adds the source's own reasons to rows that pass the declared checks (a text without
    a token). Repeated keys are not marked here: `checked_table` does that over the kept rows.

    `record` (what was read) is made for quarantined rows only: clean rows go on without it (most of a narrow row's
    bytes), so a kept copy of 10M checked rows holds what later passes read.
    Key columns other than a single declared `key` stay as typed columns too (a time series keeps its time).
    The per-column expressions are SQL text (`pipelines.sql_text`): one py4j call per projection.
    """
    raw = _read(spark, source, files)
    parsed = _parsed_by_reader(source)
    markers = [CORRUPT_RECORD, *({"csv": [_REREAD], "json": [_LINE]}.get(source.file_format, []))]
    helpers = [*markers, *[_raw(c.name) for c in source.columns]]
    # Each value is cast once here; the checks below compare the casts (Spark keeps this projection apart
    # rather than repeat a cast in every check that reads it).
    typed = raw.selectExpr(
        "input_file_name() AS source_file",
        "monotonically_increasing_id() AS position",
        *[sql.name(h) for h in markers],
        *[f"{sql.name(c.name)} AS {sql.name(_raw(c.name))}" for c in source.columns],
        *[f"{_typed(c, parsed)} AS {sql.name(c.name)}" for c in source.columns],
    )
    checked = typed.selectExpr(
        "source_file",
        "position",
        f"{_row_key(source, _values_record(source))} AS id",
        f"{_row_reason(source)} AS reason",
        *[sql.name(c.name) for c in source.columns if c.name != source.key],
        *[sql.name(h) for h in helpers],
    )
    if check is not None:
        checked = check(checked)
    record = F.when(is_quarantined(), F.expr(_record(source))).alias("record")  # built only for a quarantined row
    rest = [c for c in checked.columns if c not in ("source_file", "position", "id", *helpers)]
    return checked.select("source_file", "position", "id", record, *[sql.column(c) for c in rest])


@contextmanager
def checked_table(spark: SparkSession, source: FileSource, files: list[Path], scratch: Path,
                  check: Callable[[DataFrame], DataFrame] | None = None) -> Iterator[DataFrame]:
    """The `ingest_table` rows with every repeated key marked, for the `with` block.

    The input is read and checked once, into Parquet in a scratch folder next to `scratch` (removed on exit): the
    passes that follow (counts, quarantine, split, fits, write) read from it the columns they need. A clean row whose
    key an earlier clean row has (input order: file, then position) gets the `DUPLICATE_KEY` reason; its record is
    its values as read into the declared types (a key repeats on clean rows only). Keys are counted with a shuffle
    of the key alone; only rows of repeated keys are ordered, and the few rows found are joined back (broadcast).
    """
    with ExitStack() as kept:
        with small_generated_methods(spark), file_refusals_named(files), spark_step("read and check input"):
            rows = kept.enter_context(kept_as_parquet(ingest_table(spark, source, files, check), scratch,
                                                      dictionary=_few_values(source)))  # checked as written
        log.info("read and checked %d input file(s) of %s", len(files), source.path)
        clean = rows.where(is_clean())
        with spark_step("repeated keys"):
            keys, repeated = kept.enter_context(
                materialized(clean.groupBy("id").count().where(F.col("count") > 1).select("id")))
        log.info("%d key(s) repeat on clean rows (%s)", repeated, _key_name(source))
        if not repeated:
            yield rows
            return
        earlier = Window.partitionBy("id").orderBy("source_file", "position")
        candidates = clean.join(keys, "id", "left_semi")
        ordered = candidates.withColumn("_repeat", F.row_number().over(earlier) > 1)
        later = ordered.where("_repeat").select("position", _repeat_record(source))  # a row's position is unique
        with spark_step("repeated keys"):
            repeats, _ = kept.enter_context(materialized(later))
        yield _with_repeats_marked(rows.join(repeats, "position", "left"))


def _few_values(source: FileSource) -> list[str]:
    """The checked columns expected to hold few distinct values: the file, the reason and the declared strings."""
    return ["source_file", "reason", *[c.name for c in source.columns if c.type == "string" and c.name != source.key]]


def _repeat_record(source: FileSource) -> Column:
    """`_repeat_record`: a clean row's values as read into the declared types, as JSON text (its quarantine record)."""
    values = {c.name: f"CAST({sql.name('id' if c.name == source.key else c.name)} AS STRING)" for c in source.columns}
    return F.expr(sql.json_object(values)).alias("_repeat_record")


def _with_repeats_marked(rows: DataFrame) -> DataFrame:
    """Rows joined to `_repeat_record` (set on a later row of a repeated key) -> the same rows, repeats quarantined.

    The records were made for the repeats alone, so a pass over every row reads none of their other columns.
    """
    repeat = F.col("_repeat_record")
    return rows.withColumns({
        "reason": F.when(repeat.isNotNull(), F.lit(DUPLICATE_KEY)).otherwise(F.col("reason")),
        "record": F.coalesce(repeat, F.col("record")),
    }).drop("_repeat_record")


def is_clean() -> Column:
    """True for a checked row that goes into the dataset."""
    return F.col("reason").isNull()


def _key_name(source: FileSource) -> str:
    """The row key as a message names it: its column(s), or the record hash."""
    return ", ".join(source.key_columns) or "record hash"


@spark_step("repeated keys")
def check_duplicates(checked: DataFrame, reasons: dict[str, int], source: FileSource, quarantine_dir: Path) -> None:
    """Raise when rows repeat a key and the source says duplicates fail the job, naming a few of the repeats (their
    records and files, from the `checked_table` rows) and the quarantine that holds them all."""
    repeated = reasons.get(DUPLICATE_KEY, 0)
    if repeated and source.duplicates == "fail":
        key = _key_name(source)
        shown = checked.where(F.col("reason") == DUPLICATE_KEY).select("record", "source_file").limit(SHOWN_REPEATS)
        examples = "; ".join(f"{row.record} in {row.source_file}" for row in shown.collect())
        rows = f"{repeated} rows repeat" if repeated > 1 else "1 row repeats"
        raise DataError(f"{rows} an earlier row's key '{key}' and source.duplicates is 'fail': e.g. {examples}; "
                        f"every repeat is in the quarantine at {quarantine_dir}")


def feature_columns(source: TableSource) -> tuple[list[str], list[str]]:
    """(numeric, categorical) column names besides key and label: numbers form the vector, strings get an index."""
    roles = [c for c in source.columns if c.name not in (source.key, source.label)]
    numeric = [c.name for c in roles if c.type in NUMERIC_TYPES]
    categorical = [c.name for c in roles if c.type == "string"]
    return numeric, categorical


def raw_feature_values(numeric: list[str]) -> list[str]:
    """The elements of `raw_features` (SQL text): the numeric columns as float, in declared order."""
    return [f"CAST({sql.name(name)} AS FLOAT)" for name in numeric]


def with_raw_features(rows: DataFrame, numeric: list[str]) -> DataFrame:
    """Add `raw_features`: the numeric columns as one array<float>, in declared order."""
    return rows.withColumn("raw_features", F.expr(sql.call("array", *raw_feature_values(numeric))))

"""Property: malformed CSV / JSON Lines records mixed with valid ones are each accounted for exactly once.

Every generated line carries a unique tag in its first field; after the real table ingest every tag is in
exactly one checked row (clean, or quarantined with a reason), the counts reconcile and nothing raises.
Blank lines (whitespace or control characters only) are not records, for CSV and JSON alike.
"""
from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.config import TableSource
from pipelines.quarantine import row_counts
from pipelines.tables import ingest_table, is_clean

COLUMNS = [
    {"name": "tag", "type": "string", "nullable": False},
    {"name": "x", "type": "double", "nullable": False, "min": -1e6, "max": 1e6},
    {"name": "n", "type": "int"},
    {"name": "s", "type": "string"},
]
HEADER = b"tag,x,n,s"
CLEAN, BAD, EITHER = "clean", "bad", "either"  # what the ingest must decide for a generated line
KINDS = {
    "csv": ["valid", "wrong_type", "missing", "extra", "too_few", "unclosed", "nan_inf", "utf8", "long", "odd_text"],
    "json": ["valid", "wrong_type", "missing", "extra", "truncated", "unclosed", "nan_inf", "utf8", "long", "odd_text",
             "not_object"],
}
# the decision each kind must get; a kind not listed here is CLEAN
EXPECT = {
    "csv": {"wrong_type": BAD, "missing": BAD, "extra": BAD, "too_few": BAD, "nan_inf": BAD, "unclosed": EITHER,
            "utf8": BAD, "odd_text": EITHER},
    "json": {"wrong_type": BAD, "missing": BAD, "truncated": BAD, "unclosed": BAD, "nan_inf": BAD, "not_object": BAD,
             "utf8": BAD, "odd_text": EITHER},
}
BLANK_LINES = [b"", b"   ", b"\t", b" \x01 "]
INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3(", b"\xe2\x28\xa1", b"\xf0\x90\x28", b"\x80abc"]
BYTES_HERE = "@@bytes@@"  # replaced by invalid UTF-8 after the line is encoded
# text without line breaks (Spark splits lines on \n and \r), quotes or backslashes (those are the odd_text cases)
PLAIN = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters='\r\n"\\'), max_size=12)
ODD = st.text(st.sampled_from(list(',"\\\' \t;{}[]:é中\x00\x07')), min_size=1, max_size=8)


@st.composite
def lines(draw, fmt: str) -> list[tuple[bytes, str | None]]:
    """(line, expected decision) pairs: valid records, every malformed kind, and blank lines (decision None)."""
    out = []
    for i in range(draw(st.integers(1, 12))):
        if draw(st.integers(0, 5)) == 0:
            out.append((draw(st.sampled_from(BLANK_LINES)), None))
            continue
        row = {"tag": f"t{i:03d}q", "x": draw(st.floats(-1e6, 1e6, allow_nan=False)),
               "n": draw(st.integers(-2**31, 2**31 - 1)), "s": draw(PLAIN)}
        kind = draw(st.sampled_from(KINDS[fmt]))
        line = (_csv_line if fmt == "csv" else _json_line)(draw, kind, _mutated(draw, kind, row))
        if kind == "utf8":
            line = line.replace(BYTES_HERE.encode(), draw(st.sampled_from(INVALID_UTF8)))
        out.append((line, EXPECT[fmt].get(kind, CLEAN)))
    return out


def _mutated(draw, kind: str, row: dict) -> dict:
    if kind == "wrong_type":
        column = draw(st.sampled_from(["x", "n"]))
        row[column] = draw(st.sampled_from(["abc", "1.5.2", "12a", "--1", "0x1G", *(["1.5"] if column == "n" else [])]))
    elif kind == "missing":
        del row["x"]
    elif kind == "nan_inf":
        row["x"] = draw(st.sampled_from(["NaN", "nan", "Infinity", "-Infinity", "inf"]))
    elif kind == "long":
        row["s"] = "v" * draw(st.sampled_from([5_000, 70_000, 200_000]))
    elif kind == "odd_text":
        row["s"] = draw(ODD)
    elif kind == "utf8":
        row["s"] = BYTES_HERE
    return row


def _csv_line(draw, kind: str, row: dict) -> bytes:
    fields = [str(row.get(c["name"], "")) for c in COLUMNS]
    if kind == "extra":
        fields.append(draw(PLAIN))
    if kind == "too_few":
        fields = fields[: draw(st.integers(1, len(COLUMNS) - 1))]
    if kind == "unclosed":
        fields[-1] = '"' + fields[-1]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="", quoting=csv.QUOTE_NONE if kind == "unclosed" else csv.QUOTE_MINIMAL,
               escapechar="\\").writerow(fields)
    return buffer.getvalue().encode()


def _json_line(draw, kind: str, row: dict) -> bytes:
    if kind == "extra":
        row["unexpected"] = draw(PLAIN)
    if kind == "wrong_type" and draw(st.booleans()):
        row["x"] = draw(st.sampled_from([[1, 2], {"a": 1}, True]))
    text = json.dumps(row, ensure_ascii=False)
    if kind == "truncated":
        text = text[:-1]  # no closing brace
    if kind == "unclosed":
        text = text[:-2]  # inside the last string, no closing brace
    if kind == "not_object":
        text = draw(st.sampled_from(["[{0}]", "[{0}, {0}]", "[]  {0}", '"{1}"'])).format(text, row["tag"])
    return text.encode()


def _ingest(spark, fmt: str, generated: list[tuple[bytes, str | None]]) -> tuple[list, dict]:
    body = [line for line, _ in generated]
    with tempfile.TemporaryDirectory(prefix=f"ingest-{fmt}-") as folder:  # one per example: hypothesis runs many
        path = Path(folder) / f"rows.{'csv' if fmt == 'csv' else 'jsonl'}"
        path.write_bytes(b"\n".join([HEADER, *body] if fmt == "csv" else body) + b"\n")
        source = TableSource.model_validate({"kind": fmt, "path": str(path), "columns": COLUMNS,
                                             "max_bad_fraction": 1.0})
        checked = ingest_table(spark, source, [path]).persist()
        try:
            counts = checked.agg(*row_counts(is_clean())).first().asDict()
            return checked.select("tag", "record", "reason").collect(), counts
        finally:
            checked.unpersist()


def _check_accounted(spark, fmt: str, generated: list[tuple[bytes, str | None]]) -> None:
    rows, counts = _ingest(spark, fmt, generated)
    records = [(line, expect) for line, expect in generated if expect is not None]

    assert counts["rows_in"] == len(rows) == len(records)
    assert counts["rows_clean"] + counts["rows_quarantined"] == counts["rows_in"]
    for i, (line, expect) in enumerate(generated):
        if expect is None:
            continue
        tag = f"t{i:03d}q"
        # a clean row is known by its parsed tag; a quarantined one keeps its raw record (clean rows drop theirs)
        holding = [r for r in rows if r["tag"] == tag or tag in (r["record"] or "")]
        assert len(holding) == 1, f"line {line[:80]!r} is in {len(holding)} checked rows"
        if expect == CLEAN:
            assert holding[0]["reason"] is None, f"valid line {line[:80]!r} quarantined: {holding[0]['reason']}"
        if expect == BAD:
            assert holding[0]["reason"], f"bad line {line[:80]!r} passed as clean"


PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])


@PROPERTY
@given(generated=lines("csv"))
def test_every_csv_line_is_clean_or_quarantined_exactly_once(spark, generated):
    _check_accounted(spark, "csv", generated)


@PROPERTY
@given(generated=lines("json"))
def test_every_json_line_is_clean_or_quarantined_exactly_once(spark, generated):
    _check_accounted(spark, "json", generated)

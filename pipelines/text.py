"""Text features: Spark ML RegexTokenizer, empty texts quarantined, ids from a train-only vocabulary, padded.

`TextEncoder` is the same fitted preprocessing in plain Python, for the registered model: raw strings -> the ids the
Spark ETL writes (lower-casing, Java regex split, minimum token length in UTF-16 units, vocabulary, cut and pad).
Both sides lower-case with Python's `str.lower` (locale-free; Java's `toLowerCase` depends on the JVM locale and
decides the Greek final sigma by word boundaries, which Python cannot reproduce), so only the split runs in the JVM.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np
import pandas as pd
from pyspark.ml.feature import RegexTokenizer
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.config import ConfigError, TextSource
from pipelines import sql_text as sql
from pipelines.vocabulary import Vocabulary, fit_vocabulary

PAD, OOV = "<pad>", "<oov>"
PAD_ID, OOV_ID = 0, 1
_TEXT = "_text"


def empty_text_reason(column: str) -> str:
    """The quarantine reason of a row whose text is missing, blank or has no tokens."""
    return f"column '{column}': empty text (no tokens)"


def tokenize(checked: DataFrame, source: TextSource) -> DataFrame:
    """Add `tokens` (array<string>) to checked rows; a row without a single token gets the empty-text reason."""
    python_pattern(source.token_pattern)  # the registered model must be able to split texts the same way
    tokenizer = RegexTokenizer(
        inputCol=_TEXT, outputCol="tokens", pattern=source.token_pattern, gaps=True, toLowercase=False,
        minTokenLength=source.min_token_length,
    )
    text = F.coalesce(sql.column(source.text_column), F.lit(""))
    text = checked.withColumn(_TEXT, F.pandas_udf(lowercase, "string")(text) if source.lowercase else text)
    tokens = tokenizer.transform(text).drop(_TEXT)
    empty = F.when(F.size("tokens") == 0, F.lit(empty_text_reason(source.text_column)))
    return tokens.withColumn("reason", F.coalesce(F.col("reason"), empty))


def lowercase(texts: pd.Series) -> pd.Series:
    """Python's `str.lower` of each text: the lower-casing `TextEncoder` applies at scoring time."""
    return texts.str.lower()


def fit_text_vocabulary(train: DataFrame, source: TextSource) -> Vocabulary:
    """The vocabulary of the train split's tokens: PAD (0), OOV (1), then the most frequent, capped and filtered."""
    return fit_vocabulary(train, "tokens", (PAD, OOV), OOV_ID, max_size=source.vocab_size, min_count=source.min_count)


def with_length(rows: DataFrame, max_length: int) -> DataFrame:
    """Add `length`: how many of a row's `tokens` its ids keep (at most `max_length`; every token gets an id)."""
    return rows.withColumn("length", F.least(F.size("tokens"), F.lit(max_length)))


def token_ids(rows: DataFrame, vocabulary: Vocabulary, max_length: int) -> DataFrame:
    """Replace `tokens` by `features`: exactly `max_length` int ids (cut, then padded with PAD)."""
    ids = F.slice(vocabulary.index_array(F.col("tokens")), 1, max_length)
    padded = F.concat(ids, F.array_repeat(F.lit(PAD_ID), F.lit(max_length) - F.size(ids)))
    return rows.withColumn("features", padded).drop("tokens")


def python_pattern(token_pattern: str) -> re.Pattern:
    """`token_pattern` compiled by Python as Java reads it by default: `\\w`, `\\s`, `\\d`, `\\b` are ASCII classes.

    Raises ConfigError naming the pattern when Python's `re` cannot read it (e.g. Java's `\\p{L}`).
    """
    try:
        return re.compile(token_pattern, re.ASCII)
    except re.error as exc:
        raise ConfigError(f"source.token_pattern {token_pattern!r} is not a regex Python can apply at scoring time "
                         f"({exc}); use the syntax Java and Python share") from None


@dataclass(frozen=True)
class TextEncoder:
    """The manifest's text preprocessing as plain data; `encode` turns raw texts into the ETL's padded ids."""

    token_pattern: str
    lowercase: bool
    min_token_length: int
    max_length: int
    vocabulary: Vocabulary

    @classmethod
    def from_preprocessing(cls, preprocessing: dict) -> "TextEncoder":
        """From the manifest's `preprocessing` section of a text dataset."""
        return cls(preprocessing["token_pattern"], bool(preprocessing["lowercase"]),
                   int(preprocessing["min_token_length"]), int(preprocessing["max_length"]),
                   Vocabulary.from_dict(preprocessing["vocabulary"]))

    @cached_property
    def _pattern(self) -> re.Pattern:
        return python_pattern(self.token_pattern)

    @cached_property
    def _ids(self) -> dict[str, int]:
        return {token: index for index, token in enumerate(self.vocabulary.tokens)}

    def tokens(self, text: str | None) -> list[str]:
        """RegexTokenizer's tokens (gaps=True): split on the pattern, keep pieces of at least `min_token_length`
        UTF-16 code units (Java's String.length)."""
        text = (text or "").lower() if self.lowercase else (text or "")  # as `lowercase` in the ETL
        pieces = self._pattern.split(text)[:: self._pattern.groups + 1]  # re.split also returns captured groups
        return [piece for piece in pieces if piece and _utf16_length(piece) >= self.min_token_length]

    def encode(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [N, max_length] cut and padded with PAD, lengths int64 [N]: ids before padding)."""
        ids = np.full((len(texts), self.max_length), PAD_ID, dtype=np.int64)
        lengths = np.zeros(len(texts), dtype=np.int64)
        lookup, oov = self._ids, self.vocabulary.oov_id
        for row, text in enumerate(texts):
            row_ids = [lookup.get(token, oov) for token in self.tokens(text)[: self.max_length]]
            ids[row, : len(row_ids)] = row_ids
            lengths[row] = len(row_ids)
        return ids, lengths


def _utf16_length(text: str) -> int:
    """Java's String.length: characters outside the BMP count twice."""
    return len(text) + sum(1 for char in text if ord(char) > 0xFFFF)


def vocabulary_size(manifest: dict) -> int | None:
    """The token ids a text dataset's model embeds (PAD and OOV included); None for any other dataset."""
    if manifest["source"].get("kind") != "text":
        return None
    return len(manifest["preprocessing"]["vocabulary"]["tokens"])

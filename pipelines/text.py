"""Text features: Spark ML RegexTokenizer, empty texts quarantined, ids from a train-only vocabulary, padded."""
from __future__ import annotations

from pyspark.ml.feature import RegexTokenizer
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.config import TextSource
from pipelines.vocabulary import Vocabulary, fit_vocabulary

PAD, OOV = "<pad>", "<oov>"
PAD_ID, OOV_ID = 0, 1
_TEXT = "_text"


def empty_text_reason(column: str) -> str:
    """The quarantine reason of a row whose text is missing, blank or has no tokens."""
    return f"column '{column}': empty text (no tokens)"


def tokenize(checked: DataFrame, source: TextSource) -> DataFrame:
    """Add `tokens` (array<string>) to checked rows; a row without a single token gets the empty-text reason."""
    tokenizer = RegexTokenizer(
        inputCol=_TEXT, outputCol="tokens", pattern=source.token_pattern, gaps=True, toLowercase=source.lowercase
    )
    text = checked.withColumn(_TEXT, F.coalesce(F.col(source.text_column), F.lit("")))
    tokens = tokenizer.transform(text).drop(_TEXT)
    empty = F.when(F.size("tokens") == 0, F.lit(empty_text_reason(source.text_column)))
    return tokens.withColumn("reason", F.coalesce(F.col("reason"), empty))


def fit_text_vocabulary(train: DataFrame, source: TextSource) -> Vocabulary:
    """The vocabulary of the train split's tokens: PAD (0), OOV (1), then the most frequent, capped and filtered."""
    return fit_vocabulary(train, "tokens", (PAD, OOV), OOV_ID, max_size=source.vocab_size, min_count=source.min_count)


def token_ids(rows: DataFrame, vocabulary: Vocabulary, max_length: int) -> DataFrame:
    """Replace `tokens` by exactly `max_length` int ids (cut, then padded with PAD); `length` = ids before padding."""
    ids = F.slice(vocabulary.index_array(F.col("tokens")), 1, max_length)
    padded = F.concat(ids, F.array_repeat(F.lit(PAD_ID), F.lit(max_length) - F.size(ids)))
    return rows.withColumns({"tokens": padded, "length": F.size(ids)})

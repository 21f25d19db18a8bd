"""Text classification end to end: the registered model tokenizes raw text exactly as the Spark ETL did, the text
pipeline trains an embedding + GRU classifier with 2 torchrun ranks, and Spark scores raw text with it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dl.serving import ServingModel
from jobs.config import DEFAULT_TOKEN_PATTERN, TextSource, validate_config
from jobs.etl import run_etl
from jobs.sample import TEXT_TOPICS, write_text_corpus
from pipelines.scoring import ModelContract, model_contract, score_parquet
from pipelines.split import SPLITS
from pipelines.text import OOV_ID, TextEncoder, empty_text_reason, tokenize
from pipelines.vocabulary import Vocabulary
from registry_helpers import tracking

ROOT = Path(__file__).resolve().parents[1]
TEXT_CONF = ROOT / "conf" / "text_classification.yaml"
SPARK = {"master": "local[2]", "driver_memory": "1g", "shuffle_partitions": 4}
MAX_LENGTH = 12
# Words that stress the tokenizers: accents, German sharp s, Turkish dotted/dotless i, Greek (final sigma), Cyrillic,
# CJK, emoji and other characters outside the BMP, ligatures, title-case digraphs, digits and underscores.
WORDS = ["Apple", "banana", "CAFÉ", "naïve", "Zürich", "Straße", "GROẞ", "İstanbul", "ılık", "ΟΔΟΣ", "λόγος",
         "Привет", "東京", "😀", "𝔘nicode", "ﬁne", "ǅemal", "x86_64", "don't", "e-mail", "42", "Ωmega", "K",
         "देवनागरी", "l·l", "e\u0301te"]
SEPARATORS = [" ", ", ", "\t", "-", "!! ", "\u00a0", "\u3000", " \n ", "...", "\u2028", " _ ", "\u201c", "\u201d \u2014 ",
              "\u3001", "\u2026", "\uff01"]
EMPTY_ISH = ["", "   ", "!!! ...", "\t\n", "--", "\u00a0"]


def parity_texts(count: int, seed: int = 0) -> list[str]:
    """`count` texts: random words and separators (0 to 40 words; unseen words `unseenN`), the empty-ish ones,
    and one very long text."""
    rng = np.random.default_rng(seed)
    texts = list(EMPTY_ISH) + [" ".join(WORDS * 20)]
    while len(texts) < count:
        words = [WORDS[i] if i < len(WORDS) else f"unseen{len(texts)}" for i in rng.integers(0, len(WORDS) + 2,
                                                                                           rng.integers(0, 41))]
        texts.append("".join(w + SEPARATORS[rng.integers(len(SEPARATORS))] for w in words))
    return texts


@pytest.mark.parametrize("pattern", [DEFAULT_TOKEN_PATTERN, r"\W+", r"\s+"], ids=["default", "W", "s"])
def test_the_registered_models_tokenizer_gives_the_etl_ids(spark, tmp_path, pattern):
    """300 raw texts through the Spark ETL (RegexTokenizer, vocabulary, cut/pad) and through the serving model's own
    preprocessing: the same ids for every row, and the same rows without a token (quarantined vs not scored)."""
    texts = parity_texts(300)
    source = tmp_path / "texts"
    source.mkdir()
    pd.DataFrame({"id": range(len(texts)), "text": texts, "topic": ["a", "b"] * (len(texts) // 2)}).to_json(
        source / "texts.jsonl", orient="records", lines=True, force_ascii=False)
    cfg = validate_config({
        "name": "text-parity",
        "run_dir": str(tmp_path / "run"),
        "source": {"kind": "text", "format": "json", "path": str(source), "key": "id", "text_column": "text",
                   "label": "topic", "token_pattern": pattern, "max_length": MAX_LENGTH, "max_bad_fraction": 0.2,
                   "columns": [{"name": "id", "type": "int", "nullable": False}, {"name": "text", "type": "string"},
                               {"name": "topic", "type": "string", "nullable": False}]},
        "spark": SPARK,
        "output": {"files_per_split": 1},
        "model": {"kind": "rnn", "hidden": 4, "embedding_dim": 4},
        "train": {"world_size": 1},
    }, "test")
    manifest = run_etl(cfg)
    written = pd.concat([pd.read_parquet(cfg.dataset_dir / f"split={split}", columns=["features", "length", "text"])
                         for split in SPLITS])
    serving = ServingModel(cfg.model.model_dump(mode="json"), manifest["feature_shape"], manifest["classes"], None,
                           text=manifest["preprocessing"])
    ids, reasons = serving.inputs.encode(written["text"].tolist())

    assert len(written) == manifest["counts"]["rows_clean"] > 250
    np.testing.assert_array_equal(ids, np.stack(written["features"]))
    assert ids.shape == (len(written), MAX_LENGTH) and (reasons == None).all()  # noqa: E711
    assert (ids == OOV_ID).any() and written["length"].max() == MAX_LENGTH  # unseen words; cut long texts
    # The rows the ETL quarantined as empty are exactly the ones the serving model does not score.
    quarantined = {int(json.loads(row["record"])["id"]) for row in pq.read_table(cfg.quarantine_dir).to_pylist()}
    _, all_reasons = serving.inputs.encode(texts)
    assert quarantined == {i for i, reason in enumerate(all_reasons) if reason == empty_text_reason("text")}
    assert {EMPTY_ISH.index(blank) for blank in ("", "   ", "\t\n")} <= quarantined  # blank under any pattern


def test_the_default_token_pattern_splits_on_punctuation_of_any_script_never_inside_a_word(spark, tmp_path):
    """The ETL's tokenizer (Spark) and the registered model's (Python) with the default pattern, on texts whose
    words `\\W+` would cut ("café" -> "caf"): the same tokens, and the words whole."""
    expected = {
        "Naïve café, déjà-vu!": ["naïve", "café", "déjà", "vu"],
        "東京、大阪。「京都」": ["東京", "大阪", "京都"],
        "\u201cStraße\u201d \u2014 über\u2026Ärger": ["straße", "über", "ärger"],
        "Привет,\u00a0мир\u3000¿qué? «oui»": ["привет", "мир", "qué", "oui"],
        "x86_64 l·l ﬁne 😀 देवनागरी e\u0301te": ["x86_64", "l·l", "ﬁne", "😀", "देवनागरी", "e\u0301te"],
        "don't stop-now 3.5": ["don", "t", "stop", "now", "3", "5"],
    }
    source = TextSource(kind="text", path=tmp_path, text_column="text", columns=[{"name": "text", "type": "string"}])
    rows = spark.createDataFrame([(text, None) for text in expected], "text string, reason string")
    by_spark = {row.text: row.tokens for row in tokenize(rows, source).collect()}
    served = TextEncoder(source.token_pattern, True, 1, 8, Vocabulary(("<pad>", "<oov>"), 1))
    assert by_spark == expected
    assert {text: served.tokens(text) for text in expected} == expected


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """`dlpipe run` of conf/text_classification.yaml on the sample corpus: ETL, 2 gloo ranks, promote, score."""
    tmp = tmp_path_factory.mktemp("text-run")
    write_text_corpus(tmp / "raw")
    run_dir = tmp / "run"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", str(TEXT_CONF), f"source.path={tmp / 'raw'}", f"run_dir={run_dir}",
         "spark.master=local[2]", "train.epochs=6"],
        cwd=tmp, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run_dir / "train_result.json").read_text())
    manifest = json.loads((run_dir / "dataset" / "manifest.json").read_text())
    with tracking(f"sqlite:///{run_dir / 'mlflow.db'}"):
        yield SimpleNamespace(tmp=tmp, run_dir=run_dir, result=result, manifest=manifest, stdout=done.stdout)


def test_text_pipeline_trains_a_recurrent_classifier_near_the_best_possible_accuracy(text_run):
    predictions = pq.read_table(text_run.run_dir / "predictions").to_pandas()
    assert len(predictions) == text_run.manifest["counts"]["test"] == 225
    assert predictions["id"].is_unique and predictions["reason"].isna().all()
    accuracy = (predictions["prediction"] == predictions["label"]).mean()
    # Chance is 1/3; the corpus mixes topics within sentences, so the best possible accuracy is 0.8155.
    assert 0.7 < accuracy <= 0.9
    assert accuracy == pytest.approx(text_run.result["test_metrics"]["accuracy"], abs=1e-9)
    assert f"accuracy           {accuracy:.4f}" in text_run.stdout


def test_the_registered_model_takes_raw_text(text_run):
    uri = text_run.result["model_uri"]
    assert model_contract(uri) == ModelContract(
        "text", "text", {"prediction": "int", "probability": "array<float>", "predicted_class": "string",
                         "reason": "string"}, "classification", text_run.manifest["classes"])
    signature = mlflow.models.get_model_info(uri).signature
    assert signature.inputs.input_names() == ["text"] and signature.inputs.input_types()[0].name == "string"

    sports = " ".join(part[0] for part in TEXT_TOPICS["sports"])  # "the striker scored against the league champions"
    frame = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"text": [sports, f"{sports.upper()}!!", "", None]}))
    classes = text_run.manifest["classes"]
    assert [classes[int(p)] for p in frame["prediction"][:2]] == ["sports", "sports"]
    assert frame["predicted_class"].tolist()[:2] == ["sports", "sports"]  # the class named, not only its index
    np.testing.assert_array_equal(frame["probability"][0], frame["probability"][1])  # lower-cased as in the ETL
    assert frame["prediction"][2:].isna().all() and frame["predicted_class"][2:].isna().all()
    assert frame["reason"].tolist() == [None, None, empty_text_reason("text"), empty_text_reason("text")]


def test_scoring_raw_text_with_an_unseen_word_and_an_empty_text(text_run, spark, tmp_path):
    """Spark scores raw text rows: an unseen word is OOV (two different unseen words score the same), and a text
    without a token (empty, blank, punctuation, null) gets a null prediction and the reason, in a job that succeeds."""
    cooking = "the chef simmered spiced lentils"
    rows = {"known": cooking, "unseen": f"{cooking} zzyzx", "unseen-other": f"{cooking} qwertyuiop",
            "empty": "", "blank": "   ", "punctuation": "?!", "null": None}
    texts = pa.array(list(rows.values()), pa.string())
    pq.write_table(pa.table({"id": list(rows), "text": texts}), tmp_path / "in.parquet")
    uri = text_run.result["model_uri"]
    result = score_parquet(spark, uri, tmp_path / "in.parquet", tmp_path / "predictions")
    assert (result["rows_in"], result["rows_out"]) == (7, 7)
    scored = pd.read_parquet(tmp_path / "predictions").set_index("id").loc[list(rows)]

    unscored = ["empty", "blank", "punctuation", "null"]
    assert scored.loc[unscored, "prediction"].isna().all() and scored.loc[unscored, "probability"].isna().all()
    assert scored.loc[unscored, "predicted_class"].isna().all()
    assert set(scored.loc[unscored, "reason"]) == {empty_text_reason("text")}
    assert scored.loc[["known", "unseen", "unseen-other"], "reason"].isna().all()
    # Both unseen words are OOV: the same ids, so the same probabilities (up to float rounding within a batch).
    np.testing.assert_allclose(scored.loc["unseen", "probability"], scored.loc["unseen-other", "probability"],
                               rtol=1e-6, atol=1e-7)
    classes = text_run.manifest["classes"]
    assert classes[int(scored.loc["known", "prediction"])] == scored.loc["known", "predicted_class"] == "cooking"
    # The pyfunc in pandas gives the same answers: null (NA) outputs and the reason for the unscored rows.
    frame = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"text": list(rows.values())}, index=list(rows)))
    assert frame.loc[unscored, "prediction"].isna().all() and frame.loc[unscored, "probability"].isna().all()
    scored_rows = ["known", "unseen", "unseen-other"]
    assert frame.loc[scored_rows, "prediction"].tolist() == scored.loc[scored_rows, "prediction"].astype(int).tolist()
    assert frame.loc[scored_rows, "predicted_class"].tolist() == scored.loc[scored_rows, "predicted_class"].tolist()
    assert frame.loc[unscored, "predicted_class"].isna().all()
    np.testing.assert_allclose(np.stack(frame.loc[scored_rows, "probability"]),
                               np.stack(scored.loc[scored_rows, "probability"]), rtol=1e-6)

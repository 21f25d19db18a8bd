"""`dlpipe sample digits`: sklearn's digits written as grey PNG files in class folders."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from sklearn.datasets import load_breast_cancer

from jobs.config import ConfigError
from jobs.sample import (SAMPLE_MARKER, SAMPLES, write_breast_cancer, write_digits, write_seattle_weather,
                         write_text_corpus)


def test_write_digits_writes_every_image_as_a_grey_png_in_its_class_folder(tmp_path):
    digits = load_digits()
    out = tmp_path / "digits"

    assert write_digits(out) == 1797

    assert sorted(p.name for p in out.iterdir()) == [*(str(d) for d in range(10)), SAMPLE_MARKER]
    per_class = {int(d.name): len(list(d.glob("*.png"))) for d in out.iterdir() if d.is_dir()}
    assert per_class == dict(enumerate(np.bincount(digits.target).tolist()))
    for index in (0, 1, 500, 1796):
        with Image.open(out / str(digits.target[index]) / f"{index:04d}.png") as image:
            assert image.mode == "L" and image.size == (8, 8)
            expected = np.array([[round(v * 255 / 16) for v in row] for row in digits.images[index]])
            np.testing.assert_array_equal(np.asarray(image), expected)


def test_write_digits_is_idempotent_and_replaces_stale_files(tmp_path):
    out = tmp_path / "digits"
    write_digits(out)
    first = (out / "3" / "0003.png").read_bytes()
    (out / "stale.txt").write_text("left over from an earlier run")

    assert write_digits(out) == 1797

    assert not (out / "stale.txt").exists()
    assert (out / "3" / "0003.png").read_bytes() == first
    assert sum(1 for _ in out.rglob("*.png")) == 1797


def test_a_file_or_a_folder_not_written_by_sample_is_never_replaced(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"^--out .*/mine: it exists and was not written by `dlpipe sample`"):
        write_breast_cancer(mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    a_file = tmp_path / "table.csv"
    a_file.write_text("id\n1\n")
    with pytest.raises(ConfigError, match="choose a new or empty folder"):
        write_breast_cancer(a_file)
    assert a_file.read_text() == "id\n1\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_breast_cancer(empty) == 569 and (empty / SAMPLE_MARKER).is_file()
    assert write_breast_cancer(empty) == 569  # its own folder: replaced


def test_write_breast_cancer_writes_one_csv_with_id_measurements_and_diagnosis(tmp_path):
    assert write_breast_cancer(tmp_path / "bc") == 569

    table = pd.read_csv(tmp_path / "bc" / "breast_cancer.csv")
    assert list(table.columns[:2]) == ["id", "mean_radius"] and table.columns[-1] == "diagnosis"
    assert table.shape == (569, 32)
    assert table["diagnosis"].value_counts().to_dict() == {"benign": 357, "malignant": 212}
    np.testing.assert_allclose(table.iloc[:, 1:31].to_numpy(), load_breast_cancer().data)


def test_samples_registry_names_every_writer():
    assert SAMPLES == {
        "digits": write_digits, "breast_cancer": write_breast_cancer,
        "seattle_weather": write_seattle_weather, "text": write_text_corpus,
    }


def test_write_text_corpus_writes_balanced_labelled_sentences(tmp_path):
    assert write_text_corpus(tmp_path / "text", per_topic=20) == 60

    table = pd.read_csv(tmp_path / "text" / "texts.csv")
    assert list(table.columns) == ["id", "text", "topic"] and table["id"].is_unique
    assert table["topic"].value_counts().to_dict() == {"sports": 20, "weather": 20, "cooking": 20}
    assert table["text"].str.strip().str.len().min() > 10

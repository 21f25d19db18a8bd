"""Image labels from a CSV (`source.labels`): every image file and every CSV row accounted for, labels as the CSV
gives them, one reason per kind of mismatch, and the CSV part of the dataset's lineage."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.config import PipelineConfig, validate_config
from jobs.etl import run_etl
from jobs.run import stage_fingerprint
from pipelines.errors import DataError
from pipelines.image_labels import EMPTY_LABEL, NO_IMAGE, NO_PATH, NO_ROW, SEVERAL_ROWS
from test_etl import UNIDENTIFIED, etl_config, png_bytes

CLASSES = ("cat", "dog", "owl")
NOT_AN_IMAGE = b"not an image"


def write_images(root: Path) -> dict[str, str]:
    """36 grey PNGs, 30 directly in `root` and 6 in `root/more`, each class in its own brightness band: key -> class."""
    rng = np.random.default_rng(1)
    labels = {}
    for index in range(36):
        key = f"img{index:03d}.png" if index < 30 else f"more/img{index:03d}.png"
        band = index % 3
        (root / key).parent.mkdir(exist_ok=True)
        (root / key).write_bytes(png_bytes(rng.integers(60 * band, 60 * band + 120, size=(8, 8), dtype=np.uint8)))
        labels[key] = CLASSES[band]
    return labels


def write_labels(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("file,class\n" + "".join(f"{key},{label}\n" for key, label in rows))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(image folder, the labels a clean image must get, the labels CSV kept inside the folder)."""
    root = tmp_path_factory.mktemp("flat")
    labels = write_images(root)
    (root / "notes.png").write_bytes(NOT_AN_IMAGE)
    rows = [(key, label) for key, label in labels.items() if key != "img002.png"]  # img002: no row
    rows[0] = ("./img000.png", labels["img000.png"])  # the same file, named two more ways
    rows[1] = (" img001.png ", labels["img001.png"])
    rows += [("img003.png", "dog"), ("img004.png", " "), ("notes.png", "cat"), ("gone.png", "owl"), ("", "cat")]
    rows = [row for row in rows if row != ("img004.png", labels["img004.png"])]  # img004: only the empty label
    csv = root / "labels.csv"
    write_labels(csv, rows)
    clean = {key: label for key, label in labels.items() if key not in ("img002.png", "img003.png", "img004.png")}
    return root, clean, csv


def labelled_config(root: Path, csv: Path, run_dir: Path) -> PipelineConfig:
    data = etl_config(root, run_dir).model_dump(mode="json", exclude_unset=True)
    data["source"] |= {"labels": {"path": str(csv), "path_column": "file", "label_column": "class"},
                       "max_bad_fraction": 0.5}
    return validate_config(data, "test")


@pytest.fixture(scope="module")
def etl(spark, source, tmp_path_factory) -> tuple[PipelineConfig, dict]:
    root, _, csv = source
    cfg = labelled_config(root, csv, tmp_path_factory.mktemp("run"))
    return cfg, run_etl(cfg)


def test_clean_images_get_the_labels_of_their_csv_rows(etl, source):
    cfg, manifest = etl
    _, clean, _ = source
    dataset = [row for split in ("train", "val", "test")
               for row in pq.read_table(cfg.dataset_dir / f"split={split}", columns=["id", "label"]).to_pylist()]
    got = {row["id"]: manifest["classes"][row["label"]] for row in dataset}
    assert got == clean  # 33 images, `./img000.png` and ` img001.png ` included, and the six in more/
    assert manifest["classes"] == list(CLASSES)


def test_every_file_and_row_is_counted_once_with_its_reason(etl, source):
    cfg, manifest = etl
    root, clean, csv = source
    assert manifest["counts"]["rows_in"] == 37 + 2  # image files (labels.csv is not one) + rows naming no image
    assert (manifest["counts"]["rows_clean"], manifest["counts"]["rows_quarantined"]) == (len(clean), 6) == (33, 6)
    assert manifest["quarantine_reasons"] == {
        NO_ROW: 1, SEVERAL_ROWS % 2: 1, EMPTY_LABEL: 1, UNIDENTIFIED: 1, NO_IMAGE: 1, NO_PATH: 1,
    }
    quarantine = {row["reason"]: row for row in pq.read_table(cfg.quarantine_dir).to_pylist()}
    assert quarantine[NO_ROW]["record"] == "img002.png"
    assert quarantine[NO_ROW]["source_file"].endswith(str(root / "img002.png"))
    assert quarantine[SEVERAL_ROWS % 2]["record"] == "img003.png"
    assert quarantine[UNIDENTIFIED]["record"] == f"{len(NOT_AN_IMAGE)} bytes, starting {NOT_AN_IMAGE!r}"
    assert quarantine[NO_IMAGE]["record"] == "file=gone.png, class=owl"
    assert quarantine[NO_PATH]["record"] == "file=null, class=cat"
    assert quarantine[NO_IMAGE]["source_file"].endswith(str(csv))


def test_the_labels_csv_is_part_of_the_input_hash(spark, etl, source, tmp_path):
    cfg, manifest = etl
    root, _, csv = source
    assert manifest["source"]["files"] == 37 + 1
    copy = Path(shutil.copytree(root, tmp_path / "copy"))  # the same images, one label changed
    rows = [tuple(line.split(",")) for line in csv.read_text().splitlines()[1:]]
    write_labels(copy / csv.name, [(key, "owl" if key == "./img000.png" else label) for key, label in rows])
    again = run_etl(labelled_config(copy, copy / csv.name, tmp_path / "run"))
    assert again["source"]["content_hash"] != manifest["source"]["content_hash"]
    records = ("rows_in", "rows_clean", "rows_quarantined")  # the split is stratified: it moves with the label
    assert [again["counts"][key] for key in records] == [manifest["counts"][key] for key in records]
    assert again["class_balance"] != manifest["class_balance"]


def test_a_missing_labels_csv_or_column_is_a_data_error_naming_it(spark, source, tmp_path):
    root, _, csv = source
    with pytest.raises(DataError, match=f"labels CSV {tmp_path / 'none.csv'} does not exist"):
        run_etl(labelled_config(root, tmp_path / "none.csv", tmp_path / "run"))
    other = tmp_path / "other.csv"
    other.write_text("image,class\nimg000.png,cat\n")
    with pytest.raises(DataError, match=rf"labels CSV {other} has no column 'file' \(its columns: image, class; "):
        run_etl(labelled_config(root, other, tmp_path / "run"))


def test_a_changed_labels_csv_makes_the_etl_stage_run_again(source, tmp_path):
    root, _, csv = source
    outside = tmp_path / "labels.csv"  # not below source.path, whose listing the stage fingerprint has anyway
    outside.write_text(csv.read_text())
    cfg = labelled_config(root, outside, tmp_path / "run")
    before = stage_fingerprint(cfg, "etl")
    outside.write_text(csv.read_text() + "img002.png,owl\n")
    assert stage_fingerprint(cfg, "etl") != before

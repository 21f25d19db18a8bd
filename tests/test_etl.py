"""The ETL stage on a small real image folder: quarantine, deterministic split, train-only scaling, contract."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pyspark.sql import functions as F

from jobs.config import OutputConf, PipelineConfig, SplitConf, validate_config
from jobs.etl import run_etl
from pipelines.dataset import read_manifest, write_dataset
from pipelines.errors import DataError
from pipelines.images import NOT_IN_CLASS_FOLDER, decode_image, ingest_image_folder
from pipelines.scaling import FittedScaler
from pipelines.split import assign_split

CLASS_SIZES = {"cat": 20, "dog": 23, "owl": 17}  # 60 decodable images
# round-half-up cuts of each class at 70% and 85%: cat 14/3/3, dog 16/4/3, owl 12/2/3
EXPECTED_BALANCE = {
    "train": {"cat": 14, "dog": 16, "owl": 12},
    "val": {"cat": 3, "dog": 4, "owl": 2},
    "test": {"cat": 3, "dog": 3, "owl": 3},
}
NOTES = b"not an image, just notes\n"
UNIDENTIFIED = "undecodable image: cannot identify image file"
TRUNCATED = "undecodable image: Truncated File Read"


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_class_folders(root: Path, class_sizes: dict[str, int], seed: int = 0) -> None:
    """Random grey PNGs, each class in its own brightness band; every fifth image is 10x12 (resized to 8x8)."""
    rng = np.random.default_rng(seed)
    for band, (name, size) in enumerate(class_sizes.items()):
        (root / name).mkdir(parents=True)
        for index in range(size):
            shape = (10, 12) if index % 5 == 0 else (8, 8)
            pixels = rng.integers(60 * band, 60 * band + 120, size=shape, dtype=np.uint8)
            (root / name / f"{index:03d}.png").write_bytes(png_bytes(pixels))


def etl_config(source: Path, run_dir: Path, **overrides) -> PipelineConfig:
    data = {
        "name": "etl-test",
        "run_dir": str(run_dir),
        "source": {"kind": "image_folder", "path": str(source), "image_size": [8, 8], "channels": 1},
        "spark": {"master": "local[2]", "driver_memory": "1g", "shuffle_partitions": 4},
        "output": {"files_per_split": 2},
        "model": {"kind": "cnn"},
        "train": {"world_size": 2},
    }
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    return validate_config(data, "test")


def read_split(cfg: PipelineConfig, split: str) -> pa.Table:
    return pq.read_table(cfg.dataset_dir / f"split={split}")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """60 good images in 3 class folders, plus a text file, a truncated PNG and a file outside any class folder."""
    root = tmp_path_factory.mktemp("images")
    write_class_folders(root, CLASS_SIZES)
    (root / "dog" / "notes.txt").write_bytes(NOTES)
    whole = (root / "owl" / "000.png").read_bytes()
    (root / "owl" / "broken.png").write_bytes(whole[: len(whole) // 2])
    (root / "stray.png").write_bytes((root / "cat" / "001.png").read_bytes())
    return root


@pytest.fixture(scope="module")
def etl(spark, source, tmp_path_factory) -> tuple[PipelineConfig, dict]:
    """One ETL run shared by the tests that only read its output."""
    cfg = etl_config(source, tmp_path_factory.mktemp("run"))
    return cfg, run_etl(cfg)


def test_manifest_has_every_contract_field_with_exact_counts(etl, source):
    cfg, manifest = etl
    assert read_manifest(cfg.dataset_dir) == manifest
    assert manifest["pipeline"] == "etl-test"
    assert manifest["created_at"].endswith("+00:00")
    assert manifest["counts"] == {
        "rows_in": 63, "rows_clean": 60, "rows_quarantined": 3, "train": 42, "val": 9, "test": 9,
    }
    assert manifest["class_balance"] == EXPECTED_BALANCE
    assert manifest["classes"] == ["cat", "dog", "owl"]
    assert manifest["feature_shape"] == [1, 8, 8]
    assert manifest["columns"] == {
        "id": "string", "label": "int", "features": "array<float>", "raw_features": "array<float>",
    }
    assert manifest["split"] == cfg.split.model_dump()
    assert manifest["preprocessing"]["image_size"] == [8, 8]
    assert manifest["preprocessing"]["channels"] == 1
    assert FittedScaler.from_dict(manifest["preprocessing"]["scaler"]).group_size == 64
    assert manifest["quarantine_reasons"] == {UNIDENTIFIED: 1, TRUNCATED: 1, NOT_IN_CLASS_FOLDER: 1}

    files = {p.relative_to(source).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in source.rglob("*.*")}
    per_file = "".join(f"{key}\t{files[key]}\n" for key in sorted(files))
    assert manifest["source"] == {
        "kind": "image_folder",
        "path": str(source),
        "files": 63,
        "content_hash": hashlib.sha256(per_file.encode()).hexdigest(),
    }


def test_parquet_splits_have_the_contract_schema_files_and_row_groups(etl):
    cfg, manifest = etl
    for split in ("train", "val", "test"):
        files = sorted((cfg.dataset_dir / f"split={split}").glob("*.parquet"))
        assert len(files) == 2
        assert all(pq.ParquetFile(f).num_row_groups >= 1 for f in files)
        table = read_split(cfg, split)
        assert table.num_rows == manifest["counts"][split]
        assert table.schema.field("id").type == pa.string()
        assert table.schema.field("label").type == pa.int32()
        for column in ("features", "raw_features"):
            assert pa.types.is_list(table.schema.field(column).type)
            assert table.schema.field(column).type.value_type == pa.float32()
            assert set(pc.list_value_length(table.column(column)).to_pylist()) == {1 * 8 * 8}


def test_splits_are_disjoint_cover_every_clean_row_and_keep_class_proportions(etl, source):
    cfg, manifest = etl
    ids = {split: read_split(cfg, split).column("id").to_pylist() for split in ("train", "val", "test")}
    labels = {split: read_split(cfg, split).column("label").to_pylist() for split in ("train", "val", "test")}
    clean = {f"{name}/{i:03d}.png" for name, size in CLASS_SIZES.items() for i in range(size)}

    assert sum(len(v) for v in ids.values()) == len(clean) == 60
    assert set(ids["train"]) | set(ids["val"]) | set(ids["test"]) == clean
    train, val, test = (set(ids[split]) for split in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    for split, fraction in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        assert all(key.startswith(f"{manifest['classes'][label]}/") for key, label in zip(ids[split], labels[split]))
        for index, name in enumerate(manifest["classes"]):
            count = labels[split].count(index)
            assert count == EXPECTED_BALANCE[split][name]
            assert abs(count - CLASS_SIZES[name] * fraction) < 1


def test_ranked_split_cuts_each_label_at_its_exact_counts_and_later_passes_sort_nothing(spark):
    sizes = {"one": 1, "two": 2, "three": 3, "twenty": 20}  # cuts at floor(n * 0.70 + 0.5), floor(n * 0.85 + 0.5)
    rows = [(f"{label}-{i}", label) for label, n in sizes.items() for i in range(n)]
    df = spark.createDataFrame(rows, "id string, label string").repartition(3)
    hashed = df.select("id", "label", F.xxhash64(F.lit(42), "id").alias("hash")).collect()
    expected = {}
    for label, n in sizes.items():
        ordered = sorted((row["hash"], row["id"]) for row in hashed if row["label"] == label)
        train, val = int(n * 0.70 + 0.5), int(n * 0.85 + 0.5)
        expected |= {key: "train" if i < train else "val" if i < val else "test" for i, (_, key) in enumerate(ordered)}

    split = assign_split(df, "id", "label", SplitConf())
    assert dict(split.select("id", "split").collect()) == expected
    counts = {label: [list(expected[f"{label}-{i}"] for i in range(n)).count(s) for s in ("train", "val", "test")]
              for label, n in sizes.items()}
    assert counts == {"one": [1, 0, 0], "two": [1, 1, 0], "three": [2, 1, 0], "twenty": [14, 3, 3]}
    # the order is found once, when the split is planned: a pass over the split rows runs no window (no sort)
    assert "Window" not in split._jdf.queryExecution().executedPlan().toString()


def test_split_is_deterministic_and_ignores_input_order_and_partitioning(spark, etl):
    cfg, _ = etl
    written = {
        key: split for split in ("train", "val", "test") for key in read_split(cfg, split).column("id").to_pylist()
    }
    rows = sorted((key, key.split("/")[0]) for key in written)
    forward = spark.createDataFrame(rows, "id string, label string").repartition(1)
    backward = spark.createDataFrame(rows[::-1], "id string, label string").repartition(3)

    def splits(df, conf=cfg.split):
        return dict(assign_split(df, "id", "label", conf).select("id", "split").collect())

    assert splits(forward) == splits(forward) == splits(backward) == written
    assert splits(forward, SplitConf(seed=7)) != written
    unstratified = list(splits(backward, SplitConf(stratify=False)).values())
    assert [unstratified.count(split) for split in ("train", "val", "test")] == [42, 9, 9]


def test_scaler_statistics_come_from_the_train_split_only(etl):
    cfg, manifest = etl
    raw = {s: np.array(read_split(cfg, s).column("raw_features").to_pylist()) for s in ("train", "val", "test")}
    scaler = FittedScaler.from_dict(manifest["preprocessing"]["scaler"])
    every_row = np.concatenate(list(raw.values()))

    assert (scaler.method, scaler.per, scaler.group_size) == ("zscore", "channel", 64)
    np.testing.assert_allclose(scaler.offset, [raw["train"].mean()], rtol=1e-9)
    np.testing.assert_allclose(scaler.scale, [raw["train"].std()], rtol=1e-9)
    assert abs(scaler.offset[0] - every_row.mean()) > 1e-3  # would fail if val/test leaked into the fit
    assert abs(scaler.scale[0] - every_row.std()) > 1e-3
    for split, values in raw.items():
        features = np.array(read_split(cfg, split).column("features").to_pylist())
        expected = (values - raw["train"].mean()) / raw["train"].std()
        np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(features, scaler.apply(values), rtol=1e-6, atol=1e-6)


def test_raw_features_are_the_decoded_pixels(etl, source):
    cfg, _ = etl
    table = read_split(cfg, "train").to_pydict()
    for key, values in list(zip(table["id"], table["raw_features"]))[:5]:
        with Image.open(source / key) as image:
            expected = np.asarray(image.resize((8, 8), Image.Resampling.BILINEAR) if image.size != (8, 8) else image)
        np.testing.assert_array_equal(np.array(values).reshape(8, 8), expected)


def test_bad_files_are_quarantined_with_reasons_and_counts_reconcile(etl, source):
    cfg, manifest = etl
    quarantine = pq.read_table(cfg.quarantine_dir).to_pylist()
    by_file = {row["source_file"].split(str(source) + "/")[1]: row for row in quarantine}

    assert set(by_file) == {"dog/notes.txt", "owl/broken.png", "stray.png"}
    assert all(row["source_file"].startswith("file:") for row in quarantine)
    assert by_file["dog/notes.txt"]["reason"] == UNIDENTIFIED
    assert by_file["dog/notes.txt"]["record"] == f"{len(NOTES)} bytes, starting {NOTES!r}"
    assert by_file["owl/broken.png"]["reason"] == TRUNCATED
    broken_size = (source / "owl" / "broken.png").stat().st_size
    assert by_file["owl/broken.png"]["record"].startswith(f"{broken_size} bytes, starting b'\\x89PNG")
    assert by_file["stray.png"]["reason"] == NOT_IN_CLASS_FOLDER
    counts = manifest["counts"]
    assert counts["rows_in"] == counts["rows_clean"] + counts["rows_quarantined"] == 60 + len(quarantine)


def test_images_in_folders_below_a_class_folder_take_the_class_folders_label(spark, tmp_path):
    """`<root>/<class>/<batch>/<file>`: the label is the class folder's name, never the batch folder's (which two
    classes may share)."""
    pixels = png_bytes(np.zeros((8, 8), dtype=np.uint8))
    for key in ("cat/2019/a.png", "cat/2020/b.png", "dog/2019/c.png", "dog/d.png", "e.png"):
        (tmp_path / "in" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / key).write_bytes(pixels)
    cfg = etl_config(tmp_path / "in", tmp_path / "run")
    rows = ingest_image_folder(spark, cfg.source).select("id", "label", "reason").collect()
    assert sorted((row["id"], row["label"], row["reason"]) for row in rows) == [
        ("cat/2019/a.png", "cat", None), ("cat/2020/b.png", "cat", None), ("dog/2019/c.png", "dog", None),
        ("dog/d.png", "dog", None), ("e.png", None, NOT_IN_CLASS_FOLDER),
    ]


def test_decode_image_keeps_channel_height_width_order_and_resizes():
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    pixels = decode_image(png_bytes(rgb), (2, 3), channels=3)
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, np.repeat([10.0, 20.0, 30.0], 6))
    assert decode_image(png_bytes(rgb), (4, 5), channels=1).shape == (20,)


def test_missing_or_empty_input_folder_is_a_data_error_naming_it(spark, tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DataError, match=f"{missing}.* does not exist"):
        run_etl(etl_config(missing, tmp_path / "run"))
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{empty}.* contains no files"):
        run_etl(etl_config(empty, tmp_path / "run"))


def test_too_many_bad_files_fail_with_the_fraction_and_quarantine_path(spark, tmp_path):
    source = tmp_path / "images"
    write_class_folders(source, {"a": 4, "b": 4})
    (source / "a" / "x.txt").write_bytes(b"x")
    (source / "b" / "y.txt").write_bytes(b"y")
    cfg = etl_config(source, tmp_path / "run")

    with pytest.raises(DataError, match=rf"quarantined fraction 0\.2000 \(2 of 10 rows\) exceeds source\.max_bad_"
                                        rf"fraction 0\.05 \(most common reasons: 2 rows \"{UNIDENTIFIED}\"\); see the "
                                        rf"quarantine at {cfg.quarantine_dir}$"):
        run_etl(cfg)
    assert pq.read_table(cfg.quarantine_dir).num_rows == 2
    assert not cfg.dataset_dir.exists()


IN_TURN = "element_at(array('train', 'train', 'val', 'test'), CAST(id % 4 AS INT) + 1)"  # splits 1/2, 1/4, 1/4


def _written_ids(spark, out, rows_in: int, partitions: int, split: str = IN_TURN, files: int = 2,
                 world_size: int = 2) -> dict[str, list[list[str]]]:
    """Write `rows_in` rows (ids 00000..., the split of id `split` (SQL)) from `partitions` partitions (the k-th
    holding the k-th run of ids) as `files` files per split; the ids of each split's files, in file order."""
    rows = spark.range(rows_in, numPartitions=partitions).selectExpr(
        "lpad(id, 5, '0') AS id", "array(CAST(id AS FLOAT)) AS features", f"{split} AS split")
    counts = {"train": 0, "val": 0, "test": 0} | {row["split"]: row["count"] for row in rows.groupBy("split").count()
                                                    .collect()}
    write_dataset(rows, out, {"counts": counts}, {}, OutputConf(files_per_split=files), world_size=world_size)
    paths = {split: sorted(out.glob(f"split={split}/*.parquet")) for split in ("train", "val", "test")}
    return {split: [pq.read_table(path).column("id").to_pylist() for path in files] for split, files in paths.items()}


@pytest.mark.parametrize("rows_in", [120, 8400])
def test_each_split_is_written_as_the_same_files_from_any_partitioning(spark, tmp_path, rows_in):
    """With 2 files per split, each row is written once, in id order in its file, and which file holds it depends on
    its key alone: the same files from 1, 4 or 6 input partitions (the same dataset, so the same training, on a
    cluster as on one host). 120 rows (under 1,000 per file) are cut by rank into files of n // 2 rows; 8,400 rows
    are spread by a hash of the id, near-evenly."""
    written = [_written_ids(spark, tmp_path / str(partitions), rows_in, partitions) for partitions in (1, 4, 6)]
    assert written[1:] == [written[0]] * 2
    for split, files in written[0].items():
        expected = [f"{i:05d}" for i in range(rows_in) if ("train", "train", "val", "test")[i % 4] == split]
        assert sorted(i for ids in files for i in ids) == expected
        assert all(ids == sorted(ids) for ids in files)
        sizes = sorted(len(ids) for ids in files)
        assert len(sizes) == 2 and (sizes == [len(expected) // 2] * 2 if rows_in == 120
                                    else sizes[1] - sizes[0] < 0.1 * len(expected))


def test_a_small_split_fills_every_file_evenly_beside_a_large_split_spread_by_hash(spark, tmp_path):
    """Split by a hash of the key alone, 4 val rows land in 4 different files of 4 only 3 times in 32; placed by their
    rank in that hash order, a small split of n rows gets n // 4 or n // 4 + 1 rows in each file, so a world size of 4
    reads every split. The large train split beside them is spread by the hash (no sort of it in one task). The
    files are the same from 1 partition as from 3."""
    split = "CASE WHEN id < 4 THEN 'val' WHEN id < 10 THEN 'test' ELSE 'train' END"
    written = [_written_ids(spark, tmp_path / str(partitions), 8010, partitions, split, files=4, world_size=4)
               for partitions in (1, 3)]
    for each in written:
        assert [len(ids) for ids in each["val"]] == [1, 1, 1, 1]
        assert sorted(len(ids) for ids in each["test"]) == [1, 1, 2, 2]
        assert len(each["train"]) == 4 and all(1800 < len(ids) < 2200 for ids in each["train"])
        for split_name, files in each.items():
            expected = [f"{i:05d}" for i in range(8010) if (split_name == "val") == (i < 4)
                        and (split_name == "test") == (4 <= i < 10)]
            assert sorted(i for ids in files for i in ids) == expected and all(ids == sorted(ids) for ids in files)
    assert {split: sorted(files) for split, files in written[0].items()} == {
        split: sorted(files) for split, files in written[1].items()}


def test_a_val_split_with_fewer_rows_than_ranks_fails_naming_it_and_writes_no_dataset(spark, tmp_path):
    """Training shards every split by row group, so the ETL refuses a val split that some rank would get no row of."""
    split = "CASE WHEN id < 1 THEN 'val' WHEN id < 3 THEN 'test' ELSE 'train' END"
    with pytest.raises(DataError, match=r"^\S+/out/split=val: 1 Parquet row group\(s\) for train\.world_size 2 \(each "
                                        r"rank reads whole row groups\): it has only 1 row\(s\): add data or raise "
                                        r"split\.val$"):
        _written_ids(spark, tmp_path / "out", 40, 2, split)
    assert not (tmp_path / "out").exists()


def test_train_split_with_fewer_row_groups_than_ranks_fails_and_writes_no_dataset(spark, tmp_path):
    source = tmp_path / "images"
    write_class_folders(source, {"a": 7, "b": 7})
    cfg = etl_config(source, tmp_path / "run", output={"files_per_split": 1}, train={"world_size": 2})

    with pytest.raises(DataError, match=r"/dataset/split=train: 1 Parquet row group\(s\) for train\.world_size 2 "
                                        r"\(each rank reads whole row groups\): write at least 2 files"):
        run_etl(cfg)
    assert not cfg.dataset_dir.exists()
    assert not list(cfg.run_dir.glob(".dataset.tmp-*"))


def test_rerun_replaces_the_dataset_with_identical_content(etl):
    cfg, manifest = etl
    before = {split: read_split(cfg, split).sort_by("id") for split in ("train", "val", "test")}

    again = run_etl(cfg)

    assert {**again, "created_at": None} == {**manifest, "created_at": None}
    for split, table in before.items():
        assert read_split(cfg, split).sort_by("id").equals(table)
    # only the outputs (and the default MLflow store the ETL run is tracked in): no staging or replaced folders left
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["dataset", "mlartifacts", "mlflow.db", "quarantine"]

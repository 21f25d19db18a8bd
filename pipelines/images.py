"""Image folder ingest: one row per file, decoded to pixels in Arrow batches, or quarantined with a reason.

Layout: `<root>/<class>/<file>`, or deeper (`<root>/<class>/<any folders>/<file>`); the label is the name of the
folder directly below `<root>`, as torchvision's and Keras' image folders read it, and the row key `id` is the path
relative to `<root>` (e.g. `3/0042.png`). With `source.labels`, a CSV gives the labels instead and the
files may sit anywhere below `<root>` (`pipelines/image_labels.py`). A row with a `reason` is quarantined; the rest
are clean.
Like every Spark file source, the listing skips hidden files and folders (names starting with `.` or `_`).
Every mode PIL reads (grey, 16-bit grey, bilevel, grey + alpha, palette, RGB, RGBA, CMYK JPEG) is converted to
`channels` (alpha is dropped, not composited, as torchvision's folder loader does) and resized to `image_size`; an
image whose header claims more than `max_image_pixels` pixels is quarantined before its pixels are decoded.
"""
from __future__ import annotations

import io
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from jobs.config import ImageFolderSource
from pipelines.errors import DataError
from pipelines.image_labels import labelled_by_csv, read_labels

_ARROW_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("id", pa.string()),
        ("label", pa.string()),
        ("raw_features", pa.list_(pa.float32())),
        ("record", pa.string()),
        ("reason", pa.string()),
        ("content_sha256", pa.string()),
    ]
)
DECODED_SCHEMA = from_arrow_schema(_ARROW_SCHEMA)
RECORD_HEAD_BYTES = 32  # how much of a quarantined file's content its `record` shows
NOT_IN_CLASS_FOLDER = "not in a class folder: the file sits directly in the source folder"


def feature_shape(source: ImageFolderSource) -> tuple[int, int, int]:
    """The decoded tensor shape [C, H, W] of every clean image of `source`."""
    height, width = source.image_size
    return source.channels, height, width


class ImageTooLarge(ValueError):
    """An image whose header claims more pixels than `source.max_image_pixels` (a decompression bomb, or just huge)."""


@contextmanager
def _pil_pixel_limit(limit: int | None) -> Iterator[None]:
    """PIL's process-wide decompression-bomb limit set to `limit` (None: off) for one decode, then restored.

    Spark's Python workers decode a partition's batches one at a time in one thread, so nothing else sees it.
    """
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit grey (`I;16`) rescaled to 8 bits (65535 -> 255); PIL's own conversion would clip it at 255."""
    if not image.mode.startswith("I;16"):
        return image
    return Image.fromarray(np.round(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8))


def decode_image(
    data: bytes,
    image_size: tuple[int, int],
    channels: int,
    max_pixels: int = ImageFolderSource.model_fields["max_image_pixels"].default,
) -> np.ndarray:
    """Decode one image file to float32 pixels 0..255, flattened C*H*W in C,H,W order; raises if undecodable.

    The size is read from the header first (PIL's own bomb check off, so its warning or error cannot pre-empt
    ours): more than `max_pixels` raises ImageTooLarge before anything is decoded. The decode itself runs under
    PIL's check at `max_pixels`, which also guards frames and tiles that claim more than the header.
    """
    with _pil_pixel_limit(None), Image.open(io.BytesIO(data)) as image:
        claimed = image.size  # (width, height), from the header alone
    if claimed[0] * claimed[1] > max_pixels:
        raise ImageTooLarge(f"image too large: {claimed[0]}x{claimed[1]} pixels exceeds {max_pixels}")
    with _pil_pixel_limit(max_pixels):
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # checks the whole file (chunk CRCs, end marker): catches truncation that load() forgives
        with Image.open(io.BytesIO(data)) as image:
            pixels = _eight_bit(image).convert("L" if channels == 1 else "RGB")
    height, width = image_size
    if pixels.size != (width, height):
        pixels = pixels.resize((width, height), Image.Resampling.BILINEAR)
    values = np.asarray(pixels, dtype=np.float32)
    return (values if channels == 1 else values.transpose(2, 0, 1)).reshape(-1)


def quarantine_reason(error: Exception) -> str:
    """A precise, stable reason for a file PIL could not decode (no object addresses, so reasons group)."""
    if isinstance(error, UnidentifiedImageError):
        return "undecodable image: cannot identify image file"
    if isinstance(error, ImageTooLarge):
        return str(error)
    return f"undecodable image: {str(error) or type(error).__name__}"


def relative_key(path: str, root: str) -> str:
    """The path of a file below `root`, as Spark lists it (`file:/root/3/0042.png` -> `3/0042.png`)."""
    _, found, key = path.partition(root.rstrip("/") + "/")
    if not found:
        raise ValueError(f"{path} is not below the source folder {root}")
    return key


def _describe_bytes(content: bytes) -> str:
    return f"{len(content)} bytes, starting {content[:RECORD_HEAD_BYTES]!r}"


def _decode_file(
    key: str, content: bytes, image_size: tuple[int, int], channels: int, max_pixels: int, folder_labels: bool
) -> tuple[str | None, np.ndarray | None, str | None]:
    """(label, pixels, reason) of one file: pixels when it decodes, else None and why not. The label is the name
    of the class folder (the first part of `key`) with `folder_labels`, else None (a labels CSV gives it)."""
    class_folder, _, below = key.partition("/")
    if folder_labels and not below:
        return None, None, NOT_IN_CLASS_FOLDER
    label = class_folder if folder_labels else None
    try:
        return label, decode_image(content, image_size, channels, max_pixels), None
    except Exception as error:  # any decoding failure is a property of the file: quarantine it
        return label, None, quarantine_reason(error)


def _float_lists(rows: list[np.ndarray | None]) -> pa.ListArray:
    """An Arrow list<float> column from per-row arrays (None -> null), built from one flat buffer."""
    lengths = [0 if row is None else len(row) for row in rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    present = [row for row in rows if row is not None]
    flat = np.concatenate(present) if present else np.empty(0, dtype=np.float32)
    nulls = pa.array([row is None for row in rows], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float32()), mask=nulls)


def _decode_batch(
    batch: pa.RecordBatch, root: str, image_size: tuple[int, int], channels: int, max_pixels: int,
    folder_labels: bool,
) -> pa.RecordBatch:
    keys = [relative_key(path, root) for path in batch.column("path").to_pylist()]
    contents = batch.column("content").to_pylist()
    decoded = [_decode_file(key, content, image_size, channels, max_pixels, folder_labels)
               for key, content in zip(keys, contents)]
    reasons = [reason for _, _, reason in decoded]
    records = [None if reason is None else _describe_bytes(content) for reason, content in zip(reasons, contents)]
    columns = [
        batch.column("path"),
        pa.array(keys, type=pa.string()),
        pa.array([label for label, _, _ in decoded], type=pa.string()),
        _float_lists([pixels for _, pixels, _ in decoded]),
        pa.array(records, type=pa.string()),
        pa.array(reasons, type=pa.string()),
        batch.column("content_sha256"),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=_ARROW_SCHEMA)


def _decode_batches(
    batches: Iterator[pa.RecordBatch], root: str, image_size: tuple[int, int], channels: int, max_pixels: int,
    folder_labels: bool,
) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        yield _decode_batch(batch, root, image_size, channels, max_pixels, folder_labels)


def ingest_image_folder(spark: SparkSession, source: ImageFolderSource) -> DataFrame:
    """One row per file below `source.path` (schema `DECODED_SCHEMA`): decoded pixels, or a quarantine reason;
    with `source.labels`, labelled by that CSV, plus a quarantined row for each CSV row that names no file."""
    root = Path(source.path).resolve()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (source.path: {source.path})")
    if not any(path.is_file() for path in root.rglob("*")):
        raise DataError(f"image folder {root} contains no files (source.path: {source.path})")
    files = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(root))
    if source.labels is not None:  # a labels CSV kept among the images is not an image
        files = files.where(~F.col("path").endswith(str(Path(source.labels.path).resolve())))
    files = files.select("path", "content", F.sha2("content", 256).alias("content_sha256"))
    decode = partial(
        _decode_batches,
        root=str(root),
        image_size=tuple(source.image_size),
        channels=source.channels,
        max_pixels=source.max_image_pixels,
        folder_labels=source.labels is None,
    )
    decoded = files.mapInArrow(decode, DECODED_SCHEMA)
    if source.labels is None:
        return decoded
    return labelled_by_csv(decoded, read_labels(spark, source.labels))


def is_clean() -> Column:
    """True for a decoded row that goes into the dataset."""
    return F.col("reason").isNull() & F.col("raw_features").isNotNull()


def clean_rows(decoded: DataFrame) -> DataFrame:
    """The decoded images: `id`, `label` (class folder name, or the labels CSV's), `raw_features`."""
    return decoded.where(is_clean()).select("id", "label", "raw_features")

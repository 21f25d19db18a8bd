"""Packaged data sets written out as raw files, so every pipeline ingests files like it would in production."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_digits
from vega_datasets import local_data

from jobs.config import ConfigError
from pipelines.atomic import atomic_directory

DIGITS_MAX_VALUE = 16  # load_digits pixels are counts 0..16 of an 8x8 downsampled 32x32 bitmap
SAMPLE_MARKER = "_dlpipe_sample"  # in every folder `dlpipe sample` writes (hidden from Spark's and dlpipe's listings)


@contextmanager
def sample_folder(out_dir: Path) -> Iterator[Path]:
    """A new folder to write a sample into, which replaces `out_dir` whole when the block succeeds.

    ConfigError, before anything is written, when `out_dir` is a file, or a folder holding files that `dlpipe sample`
    did not write (it would be lost): a folder is replaced only when it is empty or marked as a sample.
    """
    replaceable = not out_dir.exists() or out_dir.is_dir() and (
        (out_dir / SAMPLE_MARKER).exists() or not any(out_dir.iterdir()))
    if not replaceable:
        raise ConfigError(f"--out {out_dir}: it exists and was not written by `dlpipe sample` (it has no "
                          f"{SAMPLE_MARKER}), and a sample replaces its folder whole; choose a new or empty folder")
    with atomic_directory(out_dir) as staging:
        staging.mkdir()
        yield staging
        (staging / SAMPLE_MARKER).write_text("written by `dlpipe sample`; replaced whole when it is written again\n")


def write_digits(out_dir: Path) -> int:
    """Write sklearn's digits as grey PNGs `out_dir/<digit>/<index:04d>.png`, replacing out_dir; return the count."""
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)
    with sample_folder(Path(out_dir)) as staging:
        for index, (image, target) in enumerate(zip(pixels, digits.target)):
            class_dir = staging / str(int(target))
            class_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(class_dir / f"{index:04d}.png")
    return len(pixels)


def write_breast_cancer(out_dir: Path) -> int:
    """Write sklearn's breast-cancer table as `out_dir/breast_cancer.csv` (id, 30 measurements, diagnosis).

    Returns the number of rows; the diagnosis is `malignant` or `benign`.
    """
    data = load_breast_cancer(as_frame=True)
    table = data.data.rename(columns=lambda name: name.replace(" ", "_"))
    table.insert(0, "id", range(len(table)))
    table["diagnosis"] = data.target.map(dict(enumerate(data.target_names)))  # 0 malignant, 1 benign
    with sample_folder(Path(out_dir)) as staging:
        table.to_csv(staging / "breast_cancer.csv", index=False)
    return len(table)


def write_seattle_weather(out_dir: Path) -> int:
    """Write vega_datasets' Seattle daily weather (2012-2015) as `out_dir/seattle_weather.csv`; return the row count."""
    table = local_data.seattle_weather()
    table["date"] = table["date"].dt.strftime("%Y-%m-%d")
    with sample_folder(Path(out_dir)) as staging:
        table.to_csv(staging / "seattle_weather.csv", index=False)
    return len(table)


TEXT_TOPICS = {  # topic -> (subjects, verbs, objects): sentences are "<opener><subject> <verb> <object><coda>."
    "sports": (["the striker", "our goalkeeper", "the home team", "a young sprinter", "the coach"],
               ["scored against", "trained with", "celebrated beating", "lost the final to", "passed the ball to"],
               ["the league champions", "a rival club", "the national squad", "the visitors", "the defenders"]),
    "weather": (["heavy rain", "a cold front", "the morning fog", "strong wind", "a summer storm"],
                ["swept across", "lingered over", "flooded", "cooled down", "moved toward"],
                ["the coast", "the valley", "the northern hills", "the city centre", "the harbour"]),
    "cooking": (["the chef", "my grandmother", "a home cook", "the baker", "our kitchen team"],
                ["roasted", "seasoned", "simmered", "baked", "sliced"],
                ["fresh vegetables", "a garlic sauce", "the sourdough loaf", "spiced lentils", "ripe tomatoes"]),
}
TEXT_OPENERS = ["", "", "apparently ", "yesterday ", "according to the report ", "once again "]
TEXT_CODAS = ["", " today", " again this week", " before noon", " as expected"]
# Each of a sentence's three parts comes from its own topic with this probability, else from one of the other two
# topics: sentences mix topics, so the label is ambiguous for some of them. The best possible accuracy on this
# corpus (predict the topic most parts come from, guess on a three-way tie) is
# 0.7**3 + 3 * 0.7**2 * 0.3 + 3 * 0.7 * 0.3**2 * (1/2) * (1/3) = 0.8155.
TEXT_TOPIC_PURITY = 0.7


def write_text_corpus(out_dir: Path, per_topic: int = 500, seed: int = 0) -> int:
    """Write a labelled corpus of template sentences as `out_dir/texts.csv` (id, text, topic); return the row count.

    Sentence parts are drawn across topics (`TEXT_TOPIC_PURITY`), so no classifier can reach accuracy 1.0.
    """
    rng = np.random.default_rng(seed)
    topics = list(TEXT_TOPICS)
    rows = []
    for topic in topics:
        others = [t for t in topics if t != topic]
        for _ in range(per_topic):
            sources = [topic if rng.random() < TEXT_TOPIC_PURITY else others[rng.integers(2)] for _ in range(3)]
            options = (TEXT_TOPICS[source][part] for part, source in enumerate(sources))
            subject, verb, obj = (phrases[rng.integers(len(phrases))] for phrases in options)
            opener, coda = TEXT_OPENERS[rng.integers(len(TEXT_OPENERS))], TEXT_CODAS[rng.integers(len(TEXT_CODAS))]
            text = f"{opener}{subject} {verb} {obj}{coda}."
            rows.append({"id": len(rows), "text": text[0].upper() + text[1:], "topic": topic})
    with sample_folder(Path(out_dir)) as staging:
        pd.DataFrame(rows).to_csv(staging / "texts.csv", index=False)
    return len(rows)


SAMPLES: dict[str, Callable[[Path], int]] = {
    "digits": write_digits,
    "breast_cancer": write_breast_cancer,
    "seattle_weather": write_seattle_weather,
    "text": write_text_corpus,
}

"""The only module that imports petastorm: one rank's shard of a Parquet split, as torch batches.

petastorm is imported when a reader opens, so the trainer (and its Arrow loader) runs where petastorm is not
installed, and `import dl.trainer` does not pay for it.

petastorm shards by Parquet row group (row group i goes to rank i % world_size), so shards can be
uneven and a split needs at least as many row groups as ranks. Batches are cut from petastorm's
columnar row-group reads directly (its row-by-row `DataLoader` is several times slower on array columns).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipelines.shards import check_shardable

# petastorm 0.12 drives pyarrow's legacy dataset API, which warns on every read, and leaves files to the GC.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm\.")
warnings.filterwarnings("ignore", category=ResourceWarning, module=r"petastorm\.")

COLUMNS = ("id", "label", "features")


def _columns(chunk) -> dict:
    return {
        "id": chunk.id,
        "label": torch.from_numpy(chunk.label.astype(np.int64)),
        "features": torch.from_numpy(chunk.features).float(),
    }


def _concat(chunks: list[dict]) -> dict:
    if len(chunks) == 1:
        return chunks[0]
    return {
        "id": np.concatenate([c["id"] for c in chunks]),
        "label": torch.cat([c["label"] for c in chunks]),
        "features": torch.cat([c["features"] for c in chunks]),
    }


def _rows(batch: dict, start: int, stop: int | None) -> dict:
    return {name: column[start:stop] for name, column in batch.items()}


def iter_batches(
    path: str | Path,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    workers_count: int = 2,
) -> Iterator[dict]:
    """One pass over this rank's row groups of a split as {"id", "label", "features"} batches (the last may be short).

    With `shuffle`, row-group order and the rows in each row group are permuted by `seed`: pass a new one each epoch.
    """
    from petastorm import make_batch_reader

    url = f"file://{Path(path).resolve()}"  # not as_uri(): petastorm does not unquote the "=" in split=...
    with make_batch_reader(
        url,
        schema_fields=list(COLUMNS),
        num_epochs=1,
        cur_shard=rank,
        shard_count=world_size,
        seed=seed,
        shuffle_row_groups=shuffle,
        shuffle_rows=shuffle,
        workers_count=workers_count,
    ) as reader:
        pending: list[dict] = []
        pending_rows = 0
        for chunk in reader:
            pending.append(_columns(chunk))
            pending_rows += len(pending[-1]["label"])
            if pending_rows < batch_size:
                continue
            merged = _concat(pending)
            full = pending_rows - pending_rows % batch_size
            for start in range(0, full, batch_size):
                yield _rows(merged, start, start + batch_size)
            pending = [_rows(merged, full, None)] if full < pending_rows else []
            pending_rows -= full
        if pending:
            yield _concat(pending)


class PetastormLoader:
    """This rank's petastorm shard of a split, one epoch per pass; shards can be uneven, so the trainer joins."""

    equal_steps = False

    def __init__(self, path: str | Path, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        check_shardable(path, world_size)
        self.path, self.batch_size, self.rank, self.world_size = Path(path), batch_size, rank, world_size
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the epoch (it seeds the shuffle); petastorm's worker pool cannot replay a partial epoch exactly."""
        if start_step:
            raise ValueError("petastorm cannot resume mid-epoch; use train.loader=arrow for mid-epoch checkpoints")
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        return iter_batches(self.path, self.batch_size, self.rank, self.world_size, self.seed + self.epoch, self.shuffle)

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
import pyarrow.dataset as pads
import torch

from pipelines.errors import DataError

# petastorm 0.12 drives pyarrow's legacy dataset API, which warns on every read, and leaves files to the GC.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm\.")
warnings.filterwarnings("ignore", category=ResourceWarning, module=r"petastorm\.")

COLUMNS = ("id", "label", "features")


class ShardingError(DataError):
    """A split has fewer Parquet row groups than ranks, so some rank would get no data."""


def split_dir(dataset_dir: str | Path, split: str) -> Path:
    """The directory of one split of a dataset: `<dataset>/split=<split>`."""
    return Path(dataset_dir) / f"split={split}"


def count_row_groups(path: str | Path) -> int:
    """Parquet row groups over all data files of a split directory (the unit petastorm shards by)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: split directory not found")
    dataset = pads.dataset(path, format="parquet")
    return sum(fragment.metadata.num_row_groups for fragment in dataset.get_fragments())


def check_shardable(path: str | Path, world_size: int) -> int:
    """Return the split's row-group count; raise ShardingError when it is below `world_size`."""
    row_groups = count_row_groups(path)
    if row_groups < world_size:
        raise ShardingError(
            f"{path}: {row_groups} Parquet row group(s) for world size {world_size}; petastorm shards by "
            f"row group, so write at least {world_size} (output.files_per_split) or train on fewer ranks"
        )
    return row_groups


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

"""A written split's folder and its Parquet row groups: the unit every training loader shards across ranks.

The ETL checks each split it writes, and the launchers check them again before any rank starts (`train.world_size`
may have been raised since the ETL ran), with the same rule and the same message.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as pads

from pipelines.errors import DataError


class ShardingError(DataError):
    """A split has fewer Parquet row groups than ranks, so some rank would get no data."""


def split_dir(dataset_dir: str | Path, split: str) -> Path:
    """The directory of one split of a dataset: `<dataset>/split=<split>`."""
    return Path(dataset_dir) / f"split={split}"


def row_groups_and_rows(path: str | Path) -> tuple[int, int]:
    """(Parquet row groups, rows) over all data files of a split directory, from the files' footers."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: split directory not found")
    footers = [fragment.metadata for fragment in pads.dataset(path, format="parquet").get_fragments()]
    return sum(footer.num_row_groups for footer in footers), sum(footer.num_rows for footer in footers)


def check_shardable(path: str | Path, world_size: int, shown_as: str | Path | None = None) -> int:
    """Return the split's row-group count; ShardingError naming the split (`shown_as`, else `path`) and the fix when
    it is below `world_size`: more data or a larger split share when it has fewer rows than ranks, else more files."""
    row_groups, rows = row_groups_and_rows(path)
    if row_groups >= world_size:
        return row_groups
    split = Path(path).name.partition("=")[2]
    remedy = (f"it has only {rows} row(s): add data or raise split.{split}" if rows < world_size
              else f"write at least {world_size} files (output.files_per_split) or train on fewer ranks")
    raise ShardingError(f"{shown_as or path}: {row_groups} Parquet row group(s) for train.world_size {world_size} "
                        f"(each rank reads whole row groups): {remedy}")

"""Arrow-native DDP loader: Parquet row groups -> torch batches, sharded across ranks without communication.

Every rank lists the split's row groups from Parquet metadata, shuffles their order with a seed derived from
(seed, epoch), and assigns them greedily (largest first, onto the least-loaded rank), so all ranks compute the
same assignment. Each rank cuts its rows into the same number of steps, so DDP never waits on a rank that ran
out of data. Row groups are read lazily with column projection, in background threads, a few ahead.
"""
from __future__ import annotations

import heapq
import math
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

THREAD_NAME_PREFIX = "dlpipe-arrow-loader"


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group: the unit that is read, shuffled and assigned to a rank."""

    path: str
    index: int
    num_rows: int


def list_row_groups(split_dir: str | Path) -> list[RowGroup]:
    """The non-empty row groups of every Parquet file in `split_dir`, files in sorted path order."""
    files = sorted(p for p in Path(split_dir).glob("*.parquet") if not p.name.startswith(("_", ".")))
    if not files:
        raise FileNotFoundError(f"{split_dir}: no Parquet files")
    groups = []
    for path in files:
        metadata = pq.read_metadata(path)
        for index in range(metadata.num_row_groups):
            num_rows = metadata.row_group(index).num_rows
            if num_rows:
                groups.append(RowGroup(str(path), index, num_rows))
    return groups


def assign_row_groups(
    groups: Sequence[RowGroup], world_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True
) -> list[list[RowGroup]]:
    """Each rank's row groups for one epoch, in reading order; the same answer on every rank."""
    order, rank_of_bin = list(range(len(groups))), list(range(world_size))
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        order, rank_of_bin = rng.permutation(len(groups)).tolist(), rng.permutation(world_size).tolist()
    # Largest first into the least-loaded bin (ties: the lowest bin). The bins' loads depend only on the row
    # counts, so steps per epoch never change; the shuffled order (equal-sized groups) and the seeded
    # bin -> rank permutation change which rows each rank sees from epoch to epoch.
    loads = [(0, b) for b in range(world_size)]
    owner = {}
    for position in sorted(order, key=lambda i: -groups[i].num_rows):
        load, b = heapq.heappop(loads)
        owner[position] = rank_of_bin[b]
        heapq.heappush(loads, (load + groups[position].num_rows, b))
    shards: list[list[RowGroup]] = [[] for _ in range(world_size)]
    for position in order:
        shards[owner[position]].append(groups[position])
    return shards


def split_rows(num_rows: int, steps: int) -> list[int]:
    """Batch sizes that cut `num_rows` into `steps` batches differing by at most one row."""
    base, extra = divmod(num_rows, steps)
    return [base + 1] * extra + [base] * (steps - extra)


def list_column_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A list<float> column of equal-length vectors as float32 [N, D], from Arrow's flat values (no per-row work)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [_list_array_to_numpy(chunk) for chunk in chunks if len(chunk)]
    if not parts:
        width = column.type.list_size if pa.types.is_fixed_size_list(column.type) else 0
        return np.empty((0, width), np.float32)
    if len({part.shape[1] for part in parts}) > 1:
        raise ValueError(f"list column has vectors of different lengths across chunks: {[p.shape[1] for p in parts]}")
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _list_array_to_numpy(array: pa.Array) -> np.ndarray:
    num_rows = len(array)
    if array.null_count:
        raise ValueError(f"list column has {array.null_count} null vectors")
    if pa.types.is_fixed_size_list(array.type):
        width, values = array.type.list_size, array.flatten()  # flatten honours the slice offset
    elif pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        offsets = array.offsets.to_numpy()  # already shifted by the slice offset; values are not
        start, end = int(offsets[0]), int(offsets[-1])
        width = (end - start) // num_rows
        if width * num_rows != end - start or np.any(np.diff(offsets) != width):
            raise ValueError("list column has vectors of different lengths; expected one fixed length")
        values = array.values.slice(start, end - start)
    else:
        raise TypeError(f"expected a list column, got {array.type}")
    if values.null_count:
        raise ValueError(f"list column has {values.null_count} null values inside its vectors")
    flat = values.to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(num_rows, width)


def _column_to_numpy(column: pa.ChunkedArray, name: str) -> np.ndarray | pa.Array:
    """Lists -> float32 [N, D]; integers -> int64 [N]; floats -> float32 [N]; strings stay Arrow (-> str lists)."""
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return list_column_to_numpy(column)
    if column.null_count:
        raise ValueError(f"column {name!r} has {column.null_count} nulls")
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return column.combine_chunks()
    if pa.types.is_integer(kind):
        return column.to_numpy().astype(np.int64, copy=False)
    if pa.types.is_floating(kind):
        return column.to_numpy().astype(np.float32, copy=False)
    raise TypeError(f"column {name!r} has unsupported type {kind}")


def _read_chunk(
    group: RowGroup, metadata: pq.FileMetaData, columns: Sequence[str], shuffle_seed: Sequence[int] | None
) -> dict[str, np.ndarray | pa.Array]:
    """Read one row group (projected), convert its columns, and shuffle its rows if a seed is given."""
    table = pq.ParquetFile(group.path, metadata=metadata).read_row_group(group.index, columns=list(columns))
    if table.num_rows != group.num_rows:
        raise ValueError(f"{group.path} row group {group.index}: read {table.num_rows} rows, expected {group.num_rows}")
    try:
        chunk = {name: _column_to_numpy(table.column(name), name) for name in columns}
    except (ValueError, TypeError) as error:
        raise ValueError(f"{group.path} row group {group.index}: {error}") from None
    if shuffle_seed is not None:
        order = np.random.default_rng(list(shuffle_seed)).permutation(group.num_rows)
        chunk = {
            name: values.take(pa.array(order)) if isinstance(values, pa.Array) else np.take(values, order, axis=0)
            for name, values in chunk.items()
        }
    return chunk


def _to_torch(chunk: dict[str, np.ndarray | pa.Array]) -> dict[str, torch.Tensor | pa.Array]:
    """Wrap a chunk's numpy arrays as tensors (shared memory; unshuffled ones are views of Arrow buffers)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: v if isinstance(v, pa.Array) else torch.from_numpy(v) for name, v in chunk.items()}


class ArrowLoader:
    """Torch batches (dicts: tensors, plus `id` as a list of str if requested) from one split, this rank's shard.

    Every rank runs `len(loader)` steps per epoch (`equal_steps`: DDP needs no Join); each row is seen once per
    epoch by exactly one rank.
    """

    equal_steps = True

    def __init__(
        self,
        split_dir: str | Path,
        columns: Sequence[str] = ("features", "label"),
        batch_size: int = 256,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        prefetch: int = 2,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if not columns:
            raise ValueError("columns must name at least one column")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.split_dir = str(split_dir)
        self.columns = tuple(columns)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.prefetch = seed, shuffle, prefetch
        self.row_groups = list_row_groups(split_dir)
        self._position = {group: position for position, group in enumerate(self.row_groups)}  # row-shuffle seeds
        self._metadata = {path: pq.read_metadata(path) for path in {g.path for g in self.row_groups}}
        schema = next(iter(self._metadata.values())).schema.to_arrow_schema()
        missing = [name for name in self.columns if name not in schema.names]
        if missing:
            raise ValueError(f"{split_dir}: no column(s) {missing}; the split has {schema.names}")
        if len(self.row_groups) < world_size:
            raise ValueError(
                f"{split_dir}: {len(self.row_groups)} non-empty row group(s) for world_size {world_size}; "
                f"every rank needs at least one (write at least {world_size} row groups, e.g. more files per split)"
            )
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the epoch (it seeds the row-group shuffle, the rank assignment and the row shuffles) and the
        step to start at: a resumed epoch yields exactly the batches an uninterrupted one yields from that step."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch
        shards = assign_row_groups(self.row_groups, self.world_size, self.seed, epoch, self.shuffle)
        rows = [sum(g.num_rows for g in shard) for shard in shards]  # the same multiset every epoch
        self.steps = math.ceil(max(rows) / self.batch_size)
        if min(rows) < self.steps:
            raise ValueError(
                f"{self.split_dir}: row groups too uneven for world_size {self.world_size}: ranks get {rows} rows, "
                f"but every rank must run {self.steps} steps of batch_size {self.batch_size}; "
                "use a smaller batch size or more, evener row groups"
            )
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step must be in 0..{self.steps}, got {start_step}")
        self.shard = shards[self.rank]
        self.num_rows = rows[self.rank]
        self.start_step = start_step

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        shard, sizes, epoch = self.shard, split_rows(self.num_rows, self.steps), self.epoch
        skip, sizes = sum(sizes[: self.start_step]), sizes[self.start_step :]
        next_group = 0
        while next_group < len(shard) and shard[next_group].num_rows <= skip:  # whole row groups already consumed
            skip -= shard[next_group].num_rows
            next_group += 1
        pool = ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix=THREAD_NAME_PREFIX)
        pending: deque[Future] = deque()

        def submit_reads():
            nonlocal next_group
            while len(pending) < self.prefetch and next_group < len(shard):
                group = shard[next_group]
                shuffle_seed = (self.seed, epoch, self._position[group]) if self.shuffle else None
                pending.append(
                    pool.submit(_read_chunk, group, self._metadata[group.path], self.columns, shuffle_seed)
                )
                next_group += 1

        try:
            submit_reads()
            chunk, length, position = None, 0, 0
            for size in sizes:
                pieces = []
                while size:
                    if position == length:
                        future = pending.popleft()
                        chunk = _to_torch(future.result())
                        length, position, skip = len(next(iter(chunk.values()))), skip, 0
                        submit_reads()
                    take = min(size, length - position)
                    pieces.append({name: values[position : position + take] for name, values in chunk.items()})
                    position, size = position + take, size - take
                yield _join(pieces)
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


def _join(pieces: list[dict]) -> dict:
    """One batch from slices of consecutive chunks: tensors concatenated, Arrow strings as Python lists."""
    if len(pieces) == 1:
        return {k: v.to_pylist() if isinstance(v, pa.Array) else v for k, v in pieces[0].items()}
    batch = {}
    for name, first in pieces[0].items():
        if isinstance(first, pa.Array):
            batch[name] = [value for piece in pieces for value in piece[name].to_pylist()]
        else:
            batch[name] = torch.cat([piece[name] for piece in pieces])
    return batch

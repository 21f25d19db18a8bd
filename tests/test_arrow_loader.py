"""ArrowLoader: every row once per epoch across ranks, equal step counts, seeded order, exact values, clean threads."""
from __future__ import annotations

import gc
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dl.arrow_loader import (
    THREAD_NAME_PREFIX,
    ArrowLoader,
    RowGroup,
    assign_row_groups,
    list_column_to_numpy,
    list_row_groups,
    split_rows,
)

WIDTH = 6
# (rows, row_group_size) per file: deliberately uneven row groups (10,10,10,7 / 25,25 / 23 / 2,2,2,2,1 / 40,14).
FILES = [(37, 10), (50, 25), (23, 23), (9, 2), (54, 40)]


def expected_features(index: np.ndarray) -> np.ndarray:
    """Distinct, exactly representable float32 values per row: row i holds i*WIDTH + 0.5 .. i*WIDTH + WIDTH-0.5."""
    return (index[:, None] * WIDTH + np.arange(WIDTH) + 0.5).astype(np.float32)


def write_split(split_dir, files=FILES) -> dict[str, int]:
    """Write Parquet files with the dataset contract's columns; return id -> global row index."""
    split_dir.mkdir(parents=True)
    ids, start = {}, 0
    for part, (rows, row_group_size) in enumerate(files):
        index = np.arange(start, start + rows)
        flat = pa.array(expected_features(index).ravel())
        table = pa.table(
            {
                "id": [f"row-{i}" for i in index],
                "label": pa.array(index % 10, pa.int32()),
                "features": pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * WIDTH), flat),
            }
        )
        pq.write_table(table, split_dir / f"part-{part:05d}.snappy.parquet", row_group_size=row_group_size)
        ids.update({f"row-{i}": int(i) for i in index})
        start += rows
    (split_dir / "_SUCCESS").touch()
    return ids


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    split_dir = tmp_path_factory.mktemp("dataset") / "split=train"
    return split_dir, write_split(split_dir)


def epoch_ids(loader: ArrowLoader, epoch: int) -> tuple[list[str], list[int]]:
    """All ids of one epoch in order, and the size of each batch."""
    loader.set_epoch(epoch)
    ids, sizes = [], []
    for batch in loader:
        ids += batch["id"]
        sizes.append(len(batch["id"]))
    return ids, sizes


def test_row_groups_come_from_metadata_in_sorted_file_order(split):
    split_dir, _ = split
    groups = list_row_groups(split_dir)
    assert [g.num_rows for g in groups] == [10, 10, 10, 7, 25, 25, 23, 2, 2, 2, 2, 1, 40, 14]
    assert [g.path for g in groups] == sorted(g.path for g in groups)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_row_once_per_epoch_on_exactly_one_rank(split, world_size):
    split_dir, all_ids = split
    loaders = [
        ArrowLoader(split_dir, ("id", "features", "label"), batch_size=8, rank=r, world_size=world_size, seed=3)
        for r in range(world_size)
    ]
    for epoch in range(3):
        shards = [epoch_ids(loader, epoch) for loader in loaders]
        seen = [ids for ids, _ in shards]
        assert sorted(i for ids in seen for i in ids) == sorted(all_ids)  # union is everything, nothing twice
        assert sum(len(set(ids)) for ids in seen) == len(all_ids)  # so ranks are disjoint
        steps = {len(sizes) for _, sizes in shards}
        assert steps == {len(loaders[0])}  # the same step count on every rank, and __len__ says it
        assert len(loaders[0]) == -(-max(loader.num_rows for loader in loaders) // 8)  # ceil(max rows / batch)
        for (ids, sizes), loader in zip(shards, loaders):
            assert 0 < min(sizes) and max(sizes) <= 8 and max(sizes) - min(sizes) <= 1
            assert len(ids) == loader.num_rows


def test_epoch_changes_the_order_not_the_set_and_is_reproducible(split):
    split_dir, all_ids = split
    loader = ArrowLoader(split_dir, ("id",), batch_size=16, seed=7)
    first, _ = epoch_ids(loader, 0)
    second, _ = epoch_ids(loader, 1)
    assert first != second and sorted(first) == sorted(second) == sorted(all_ids)
    assert epoch_ids(ArrowLoader(split_dir, ("id",), batch_size=16, seed=7), 1)[0] == second
    assert epoch_ids(ArrowLoader(split_dir, ("id",), batch_size=16, seed=8), 1)[0] != second
    # Rows are shuffled inside row groups too, not only the row-group order.
    assert first != sorted(first, key=all_ids.get)


def test_shuffle_off_reads_in_file_order(split):
    split_dir, all_ids = split
    ids, _ = epoch_ids(ArrowLoader(split_dir, ("id",), batch_size=16, shuffle=False), 0)
    assert ids == sorted(all_ids, key=all_ids.get)


def test_values_round_trip_exactly(split):
    split_dir, all_ids = split
    for world_size in (1, 2):
        for rank in range(world_size):
            loader = ArrowLoader(split_dir, ("id", "features", "label"), batch_size=7, rank=rank, world_size=world_size)
            for batch in loader:
                index = np.array([all_ids[i] for i in batch["id"]])
                assert batch["features"].dtype == torch.float32 and batch["features"].shape == (len(index), WIDTH)
                assert batch["label"].dtype == torch.int64
                np.testing.assert_array_equal(batch["features"].numpy(), expected_features(index))
                np.testing.assert_array_equal(batch["label"].numpy(), index % 10)


def test_id_only_when_requested(split):
    split_dir, _ = split
    batch = next(iter(ArrowLoader(split_dir, batch_size=4)))
    assert set(batch) == {"features", "label"}


def test_list_column_to_numpy_honours_slices_and_chunks():
    index = np.arange(20)
    whole = pa.ListArray.from_arrays(
        pa.array(np.arange(21, dtype=np.int32) * WIDTH), pa.array(expected_features(index).ravel())
    )
    sliced = whole.slice(3, 9)  # offsets start at 3*WIDTH; .values still holds all 20 rows
    np.testing.assert_array_equal(list_column_to_numpy(sliced), expected_features(index[3:12]))
    chunked = pa.chunked_array([whole.slice(0, 2), whole.slice(5, 0), whole.slice(11, 4)])
    np.testing.assert_array_equal(list_column_to_numpy(chunked), expected_features(np.r_[0:2, 11:15]))
    large = pa.array(expected_features(index).tolist(), pa.large_list(pa.float64())).slice(2, 5)
    np.testing.assert_array_equal(list_column_to_numpy(large), expected_features(index[2:7]))
    fixed = pa.array(expected_features(index).tolist(), pa.list_(pa.float32(), WIDTH)).slice(4, 3)
    np.testing.assert_array_equal(list_column_to_numpy(fixed), expected_features(index[4:7]))
    assert list_column_to_numpy(whole.slice(0, 2)).dtype == np.float32


@pytest.mark.parametrize(
    "values, message",
    [([[1.0, 2.0], [3.0]], "different lengths"), ([[1.0, 2.0], None], "null vectors"), ([[1.0, None]], "null values")],
)
def test_list_column_to_numpy_rejects_ragged_and_null(values, message):
    with pytest.raises(ValueError, match=message):
        list_column_to_numpy(pa.array(values, pa.list_(pa.float32())))


def test_fewer_row_groups_than_ranks_is_a_clear_error(tmp_path):
    split_dir = tmp_path / "split=train"
    write_split(split_dir, files=[(10, 5)])
    with pytest.raises(ValueError, match=r"split=train.*2 non-empty row group\(s\) for world_size 3"):
        ArrowLoader(split_dir, rank=0, world_size=3)
    assert len(ArrowLoader(split_dir, batch_size=4, rank=1, world_size=2)) == 2


def test_shards_too_uneven_for_equal_steps_is_a_clear_error(tmp_path):
    split_dir = tmp_path / "split=train"
    write_split(split_dir, files=[(100, 100), (2, 2)])
    with pytest.raises(ValueError, match=r"split=train.*ranks get \[100, 2\] rows.*50 steps"):
        ArrowLoader(split_dir, batch_size=2, world_size=2)
    assert len(ArrowLoader(split_dir, batch_size=50, world_size=2, rank=1)) == 2  # 2 rows, 1 per step


def test_missing_column_names_the_split(split):
    split_dir, _ = split
    with pytest.raises(ValueError, match=r"split=train.*\['pixels'\]"):
        ArrowLoader(split_dir, columns=("pixels",))


def test_assignment_is_balanced_and_identical_everywhere():
    rng = np.random.default_rng(0)
    groups = [RowGroup(f"f{i // 3}.parquet", i % 3, int(n)) for i, n in enumerate(rng.integers(1, 500, 40))]
    for world_size in (2, 3, 5):
        for epoch in range(3):
            shards = assign_row_groups(groups, world_size, seed=1, epoch=epoch)
            assert shards == assign_row_groups(groups, world_size, seed=1, epoch=epoch)
            assert sum(len(s) for s in shards) == len(groups) and len({g for s in shards for g in s}) == len(groups)
            loads = [sum(g.num_rows for g in shard) for shard in shards]
            assert max(loads) - min(loads) <= max(g.num_rows for g in groups)
        by_epoch = [assign_row_groups(groups, world_size, seed=1, epoch=epoch) for epoch in range(4)]
        assert len({tuple(shards[0]) for shards in by_epoch}) > 1  # rank 0 does not see the same rows every epoch
        assert len({tuple(sorted(sum(g.num_rows for g in s) for s in shards)) for shards in by_epoch}) == 1


def test_reads_only_this_ranks_row_groups(split, monkeypatch):
    split_dir, _ = split
    reads = []
    original = pq.ParquetFile.read_row_group

    def recording(self, index, columns=None, **kwargs):
        reads.append((index, tuple(columns)))
        return original(self, index, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", recording)
    loader = ArrowLoader(split_dir, ("label",), batch_size=8, rank=1, world_size=3, seed=5)
    loader.set_epoch(2)
    list(loader)
    assert sorted(i for i, _ in reads) == sorted(g.index for g in loader.shard)
    assert {columns for _, columns in reads} == {("label",)}


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME_PREFIX)]


def test_prefetch_threads_stop_after_early_break(split):
    split_dir, _ = split
    before = set(loader_threads())  # other tests' loaders are not this test's business
    loader = ArrowLoader(split_dir, batch_size=4, prefetch=3)
    for step, _ in enumerate(loader):
        if step == 2:
            assert set(loader_threads()) - before
            break
    assert set(loader_threads()) <= before
    iterator = iter(loader)
    next(iterator)
    iterator.close()
    assert set(loader_threads()) <= before
    list(loader)
    assert set(loader_threads()) <= before


def test_reads_stay_at_most_prefetch_ahead(split, monkeypatch):
    split_dir, _ = split
    started = []
    original = pq.ParquetFile.read_row_group

    def counting(self, index, columns=None, **kwargs):
        started.append(index)
        return original(self, index, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    loader = ArrowLoader(split_dir, batch_size=2, prefetch=2)
    iterator = iter(loader)
    next(iterator)
    time.sleep(0.2)  # a slow training step: the readers must not run ahead of the bounded queue
    assert len(started) <= 1 + 2  # the row group being consumed + `prefetch` in flight
    iterator.close()


def _live_arrays() -> int:
    """Tensors and NumPy arrays the garbage collector can see (what a loader holding on to batches would pile up)."""
    gc.collect()
    # type(), not isinstance(): that reads each object's __class__, and a deprecated torch object warns on it
    return sum(issubclass(type(o), (torch.Tensor, np.ndarray)) for o in gc.get_objects())


def test_memory_stays_flat_across_epochs(tmp_path):
    rows, width = 40_000, 64  # 10 MB of features in 8 row groups: a loader keeping one epoch's batches adds 10 MB
    features = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(rows * width, np.float32)), width)
    (tmp_path / "split").mkdir()
    pq.write_table(pa.table({"features": features.cast(pa.list_(pa.float32())), "label": np.zeros(rows, np.int32)}),
                   tmp_path / "split" / "part-0.parquet", row_group_size=rows // 8)
    loader = ArrowLoader(tmp_path / "split", ("features", "label"), batch_size=256, prefetch=2)
    process = psutil.Process()
    arrays_after_epoch, rss_after_epoch = [], []
    for epoch in range(12):
        loader.set_epoch(epoch)
        assert sum(len(batch["label"]) for batch in loader) == rows
        arrays_after_epoch.append(_live_arrays())
        rss_after_epoch.append(process.memory_info().rss)
    # Nothing an epoch made outlives it, and after two warm-up epochs ten more add well under the 100 MB that
    # keeping each epoch's batches would (allocator noise: 10-30 MB, depending on what the process ran before).
    assert len(set(arrays_after_epoch[1:])) == 1
    assert max(rss_after_epoch[2:]) - rss_after_epoch[1] < 60_000_000


def test_reader_errors_reach_the_consumer(tmp_path):
    split_dir = tmp_path / "split=train"
    split_dir.mkdir()
    table = pa.table({"features": pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32())), "label": [0, 1]})
    pq.write_table(table, split_dir / "part-0.parquet")
    before = set(loader_threads())
    with pytest.raises(ValueError, match="part-0.parquet row group 0: .*different lengths"):
        list(ArrowLoader(split_dir, batch_size=2))
    assert set(loader_threads()) <= before


def test_split_rows():
    assert split_rows(10, 3) == [4, 3, 3]
    assert split_rows(9, 3) == [3, 3, 3]


@pytest.mark.parametrize("world_size", [1, 2])
def test_start_step_resumes_an_epoch_exactly(split, world_size):
    split_dir, _ = split
    for rank in range(world_size):
        loader = ArrowLoader(split_dir, ("id", "features"), batch_size=6, rank=rank, world_size=world_size, seed=4)
        loader.set_epoch(3)
        full = list(loader)
        assert loader.equal_steps and len(full) == len(loader)
        for start in (1, 2, len(full) // 2, len(full) - 1, len(full)):  # inside and at row-group boundaries
            loader.set_epoch(3, start_step=start)
            resumed = list(loader)
            assert [batch["id"] for batch in resumed] == [batch["id"] for batch in full[start:]]
            assert all(torch.equal(a["features"], b["features"]) for a, b in zip(resumed, full[start:]))
    with pytest.raises(ValueError, match="start_step must be in 0.."):
        loader.set_epoch(0, start_step=len(loader) + 1)

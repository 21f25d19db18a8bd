"""Training benchmark: digits-CNN samples/s fed by dlpipe's ArrowLoader vs in-memory tensors, and DDP 2 ranks vs 1.

    python -m bench.training [--rows 20000] [--epochs 2] [--repeats 3] [--world-sizes 1 2]
                             [--device cpu|cuda] [--backend gloo|nccl] [--amp off bf16 fp16] [--json PATH]

Each measurement is one torchrun job (world 1 too) running dlpipe's own `train_step` under DDP on the
architecture of conf/digits_cnn.yaml. Needs torch, numpy, pyarrow, pydantic and pyyaml only (no pyspark, mlflow,
petastorm or psutil), so the same file runs on a GPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bench.report import publish

CONF = Path(__file__).resolve().parents[1] / "conf" / "digits_cnn.yaml"
SHAPE = (1, 8, 8)
CLASSES = 10
FILES = 4  # >= the largest world size: each rank reads whole row groups
SOURCES = ("memory", "arrow")
# a failed job's lines worth reporting: an exception's message (`[rank0]: ValueError: ...`) or a native abort
FAILURE_LINE = re.compile(r"^(\[rank\d+\]: ?)?[\w.]*(Error|Exception): |terminate called|Fatal Python error")
TITLE = "Training: digits-CNN samples/s, ArrowLoader vs in-memory tensors, DDP 2 ranks vs 1"
METHOD = """\
- **Data**: N synthetic 8x8 grey images (64 float32 values in `features: list<float>`, `label: int32` of 10
  classes) written with pyarrow as our dataset layout (`split=train/`, 4 files, one row group each), cached
  under `runs/bench`.
- **Model and step**: the `model` and `train` sections of `conf/digits_cnn.yaml` (CNN [32, 64] channels,
  batch-norm, dropout 0.1, dense 128; Adam; cross-entropy; per-rank batch from `train.batch_size` unless
  `--batch-size` says otherwise), built by `dl.models.build_model`, wrapped in `DistributedDataParallel` and
  stepped by dlpipe's `dl.trainer.train_step` (with its AMP `Precision` on CUDA), the batches timed by
  `dl.trainer.timed` (the trainer's data-wait figure).
- **Paths**: in-memory tensors (the whole split as tensors on the training device, a seeded permutation per
  epoch, sliced per rank: the limit) and dlpipe's `ArrowLoader` (this rank's row groups, shuffled, prefetched),
  each at world 1 and world 2. Every measurement is its own `torchrun --standalone` job (gloo on CPU, nccl on
  CUDA); one untimed warm-up epoch, then the timed epochs; samples/s = rows trained by all ranks / the slowest
  rank's seconds. Each rank gets one intra-op thread (`OMP_NUM_THREADS=1`, `--threads-per-rank`): on a
  shared, overloaded CPU more threads per rank spin against each other and the other engineers' jobs (a
  first run with 2 threads at world 1 trained 40 samples/s). Repeats run round-robin; the table shows medians.
- **Ratios**: each row vs in-memory tensors at the same world size and precision (is the loader the
  bottleneck?), and world 2 vs world 1 on the same path (what DDP adds). On a 2-core CPU box two ranks share
  the two cores with each other (and with everything else on the machine), so the DDP ratio there measures
  overhead, not scaling; the GPU record is the one to read for that."""
NOTES = """\
The data-wait fraction is the share of step time spent waiting for the next batch: near 0 means the loader
keeps up and the model's compute is the limit. A 64-value row is tiny, so this benchmark stresses per-batch
overhead (loader slicing, DDP's all-reduce per step) more than bandwidth.

What the H100 records (one GPU, so world 1 only) say: at the config's batch of 32 every path
trains ~6,000 samples/s whatever the precision: a step of this small CNN is bound by per-step launch and
optimizer overhead, not by the loader (data wait 1-2%) nor by arithmetic, so AMP cannot help. At batch
1,024 the GPU trains ~190,000-210,000 samples/s and `ArrowLoader` reaches 0.84-0.97 of in-memory tensors with
5-6% of step time waiting for data (record of 2026-11-24, re-measured on the current code; the first such run,
2026-11-23, gave 0.74-0.94 and 5-7%); bf16/fp16 are within noise of float32 (the model is too small for tensor
cores to matter). Those GPU runs are single repeats, so differences under ~10% between their rows are not
significant; the batch-512 record (medians of 2) agrees: `ArrowLoader` 0.87-0.89 of in-memory, and bf16/fp16
10-25% slower than float32 on this tiny model (the casts autocast adds cost more than tensor cores save).
AMP is checked for correctness, not speed, by `tests/test_gpu.py` (last passed on the H100 on 2026-11-24,
3 passed): the real `fit` with nccl reaches >= 0.95 test accuracy on digits in bf16 and in fp16 (with its loss
scale checkpointed) and resumes from a checkpoint written on the GPU; weights trained there score on a
CPU-only machine (`tests/test_cuda_weights.py`). Not measured yet: DDP 2 ranks on 2 GPUs (the lent machines
had one; nccl refuses two ranks on one device).

The CPU record (2026-11-23, load average ~31 on 2 cores, 4,000 rows, one timed epoch, single repeats) has
`ArrowLoader` at 0.98 of in-memory tensors at world 1 (data wait 2%), and world 2 at 0.21-0.26 of world 1:
two gloo ranks, each all-reducing every 32-row step, on two cores shared with ~30 runnable processes. That
ratio is DDP's overhead on an oversubscribed box, not what two ranks give on two free cores."""


def ensure_dataset(data_dir: str | Path, rows: int) -> Path:
    """`rows` synthetic digit-like rows as `<dir>/split=train/` Parquet (list<float> features, int label), once."""
    root = Path(data_dir) / f"training_{rows}"
    train = root / "split=train"
    if (root / "_SUCCESS").exists():
        return train
    shutil.rmtree(root, ignore_errors=True)
    train.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for part, count in enumerate(np.diff(np.linspace(0, rows, FILES + 1).astype(int))):
        labels = rng.integers(0, CLASSES, count)
        features = rng.normal(size=(count, 64)).astype(np.float32) + labels[:, None].astype(np.float32) / CLASSES
        values = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), 64).cast(pa.list_(pa.float32()))
        table = pa.table({"features": values, "label": pa.array(labels.astype(np.int32))})
        pq.write_table(table, train / f"part-{part:05d}.parquet", row_group_size=int(count))
    (root / "_SUCCESS").touch()
    return train


class InMemoryLoader:
    """The split as tensors on `device`: per epoch a seeded permutation, this rank's interleaved share, sliced."""

    equal_steps = True

    def __init__(self, split_dir: Path, batch_size: int, rank: int, world_size: int, device: torch.device,
                 seed: int = 0):
        table = pq.read_table(split_dir, columns=["features", "label"])
        flat = table.column("features").combine_chunks().flatten().to_numpy()
        self.features = torch.from_numpy(flat.reshape(table.num_rows, -1).copy()).to(device)
        self.label = torch.from_numpy(table.column("label").to_numpy().astype(np.int64)).to(device)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        rows = len(self.label) // self.world_size * self.world_size  # equal shares: equal steps on every rank
        order = torch.randperm(len(self.label), generator=generator)[:rows][self.rank :: self.world_size]
        order = order.to(self.features.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield {"features": self.features[index], "label": self.label[index]}


def train_conf(batch_size: int | None, amp: str, backend: str):
    """The `train` section of conf/digits_cnn.yaml, with this run's batch size, precision and backend."""
    from jobs.config import load_config

    overrides = [f"train.amp='{amp}'", f"train.backend={backend}"]  # quoted: YAML reads a bare off as false
    overrides += [f"train.batch_size={batch_size}"] if batch_size else []
    return load_config(CONF, overrides)


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: warm-up epoch, then `args.epochs` timed epochs of train_step; rank 0 writes the result."""
    from dl.distributed import distributed
    from dl.losses import build_loss
    from dl.models import build_model
    from dl.optim import build_optimizer
    from dl.tasks import as_task
    from dl.trainer import STEPS, STEP_S, WAIT_S, build_precision, open_loader, timed, train_step

    cfg = train_conf(args.batch_size, args.amp[0], args.backend)
    conf = cfg.train
    with distributed(conf.backend, conf.seed) as ctx:
        if args.source == "memory":
            loader = InMemoryLoader(args.data, conf.batch_size, ctx.rank, ctx.world_size, ctx.device, conf.seed)
        else:
            loader = open_loader(conf, args.data, ctx, shuffle=True)
        network = build_model(cfg.model, SHAPE, CLASSES).to(ctx.device)
        model = DistributedDataParallel(network, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        task = as_task(CLASSES)
        optimizer = build_optimizer(network.parameters(), conf.optimizer)
        criterion = build_loss(conf.loss, task.num_outputs).to(ctx.device)
        precision = build_precision(conf.amp, ctx.device)
        tally = torch.zeros(5, dtype=torch.float64)
        samples = 0
        model.train()
        for epoch in range(args.epochs + 1):  # epoch 0 warms up (page cache, allocator, cuDNN) and is not counted
            if epoch == 1:
                _synchronize(ctx.device)
                tally.zero_()
                samples, started = 0, time.perf_counter()
            loader.set_epoch(epoch)
            for batch in timed(loader, tally):
                train_step(model, task.training_batch(batch), optimizer, criterion, conf, precision, ctx.device, task)
                samples += task.rows(batch)
                tally[STEPS] += 1
        _synchronize(ctx.device)
        seconds = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
        totals = torch.tensor([float(samples), tally[WAIT_S].item(), tally[STEP_S].item()], dtype=torch.float64)
        if ctx.device.type == "cuda":
            seconds, totals = seconds.to(ctx.device), totals.to(ctx.device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        dist.all_reduce(totals)
        if ctx.rank == 0:
            samples_all, wait_s, step_s = totals.tolist()
            args.result.write_text(json.dumps({
                "samples": int(samples_all), "seconds": seconds.item(), "samples_per_s": samples_all / seconds.item(),
                "data_wait_fraction": wait_s / max(step_s, 1e-9), "steps_per_rank": int(tally[STEPS].item()),
                "batch_size": conf.batch_size,
            }))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(data: Path, source: str, world_size: int, amp: str, args: argparse.Namespace) -> dict:
    """One torchrun job of `world_size` ranks on `source`; its result (or the failure, with the log's tail)."""
    work = Path(tempfile.mkdtemp(prefix="dlpipe-bench-training-"))
    result = work / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
               "-m", "bench.training", "--worker", "--source", source, "--data", str(data), "--result", str(result),
               "--amp", amp, "--backend", args.backend, "--epochs", str(args.epochs)]
    command += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank), "PYTHONFAULTHANDLER": "1"}  # a crash's stack
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0 or not result.exists():
            lines = (done.stdout + done.stderr).strip().splitlines()
            # the rank's exception or abort ("terminate called ...") comes first, torchrun's ChildFailedError after
            errors = [line for line in lines if FAILURE_LINE.search(line)][:3]
            detail = "\n".join(errors + lines[-4:])
            raise RuntimeError(f"training benchmark job failed ({' '.join(command)}):\n{detail}")
        return json.loads(result.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace) -> dict:
    """Every (precision, world size, source) `repeats` times, round-robin; medians and ratios."""
    data = ensure_dataset(args.data_dir, args.rows)
    if args.device == "cuda":
        available = torch.cuda.device_count()
        skipped = [w for w in args.world_sizes if w > available]
        world_sizes = [w for w in args.world_sizes if w <= available]
    else:
        skipped, world_sizes = [], list(args.world_sizes)
    cases = [(amp, world, source) for amp in args.amp for world in world_sizes for source in SOURCES]
    runs: dict[tuple, list[dict]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case in cases:
            runs[case].append(run_once(data, case[2], case[1], case[0], args))
    results = []
    for (amp, world, source), done in runs.items():
        results.append({"amp": amp, "world_size": world, "source": source, "runs": done,
                        "samples_per_s": statistics.median(r["samples_per_s"] for r in done),
                        "data_wait_fraction": statistics.median(r["data_wait_fraction"] for r in done),
                        "batch_size": done[0]["batch_size"]})
    rates = {(r["amp"], r["world_size"], r["source"]): r["samples_per_s"] for r in results}
    for r in results:
        r["vs_in_memory"] = r["samples_per_s"] / rates[r["amp"], r["world_size"], "memory"]
        world_1 = rates.get((r["amp"], 1, r["source"]))
        r["vs_world_1"] = r["samples_per_s"] / world_1 if world_1 else None
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    return {"rows": args.rows, "epochs": args.epochs, "repeats": args.repeats, "device": args.device,
            "backend": args.backend, "skipped_world_sizes": skipped, "results": results,
            "machine": {"gpu": gpu} if gpu else {}}


def markdown_table(report: dict) -> str:
    """Samples/s per path, precision and world size, with the two ratios and the data-wait fraction."""
    batch = report["results"][0]["batch_size"] if report["results"] else "?"
    lines = [f"{report['rows']:,} rows, {report['epochs']} timed epochs, per-rank batch {batch}, "
             f"{report['device']} / {report['backend']}; medians of {report['repeats']}.", "",
             "| precision | ranks | batches from | samples/s | vs in-memory | vs 1 rank | data wait |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    names = {"memory": "in-memory tensors (the limit)", "arrow": "dlpipe `ArrowLoader`"}
    for r in report["results"]:
        world = f"{r['vs_world_1']:.2f}" if r["vs_world_1"] is not None else "-"
        lines.append(f"| {r['amp']} | {r['world_size']} | {names[r['source']]} | {r['samples_per_s']:,.0f} | "
                     f"{r['vs_in_memory']:.2f} | {world} | {r['data_wait_fraction']:.1%} |")
    if report["skipped_world_sizes"]:
        lines += ["", f"Not run: world size {report['skipped_world_sizes']} (more ranks than GPUs)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=2, choices=range(1, 1000), metavar="N",
                        help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, help="per-rank batch (default: train.batch_size of the config)")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="OMP_NUM_THREADS of each rank")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", choices=("gloo", "nccl"), help="default: nccl on cuda, gloo on cpu")
    parser.add_argument("--amp", nargs="+", choices=("off", "bf16", "fp16"), default=["off"],
                        help="precisions to compare side by side (bf16/fp16 need cuda)")
    parser.add_argument("--data-dir", default="runs/bench", help="where the generated dataset is cached")
    parser.add_argument("--json", help="also write the record (every run) as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", choices=SOURCES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.worker:
        worker(args)
        return None
    if (args.device == "cuda") != (args.backend == "nccl"):
        parser.error(f"--device {args.device} goes with --backend {'nccl' if args.device == 'cuda' else 'gloo'}")
    if args.device == "cpu" and args.amp != ["off"]:
        parser.error("--amp bf16/fp16 need --device cuda")
    return publish("training", argv, lambda: run(args), markdown_table, args.json)


if __name__ == "__main__":
    main()

"""`make bench` cannot silently rot: every benchmark runs end to end at tiny sizes and the report renders them all.

No timing is asserted: only that each benchmark measured what it says (rows, counts, ratios) and that the
document holds every record's table, including a record measured on another machine (a GPU).
"""
import argparse
import json
import subprocess
import sys

import pytest

from bench import __main__ as bench_main
from bench import etl, loader, report, scoring, training
from bench.common import PeakRss


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    results, doc = root / "results", root / "BENCHMARKS.md"
    text = bench_main.main(["--quick", "--results-dir", str(results), "--doc", str(doc),
                            "--data-dir", str(root / "data")])
    records = {path.stem: json.loads(path.read_text()) for path in results.glob("*.json")}
    return records, text, doc


def test_every_benchmark_writes_a_record_with_machine_and_load(quick_run):
    records, _, _ = quick_run
    assert set(records) == {"loader", "scoring", "etl", "training"}
    for name, record in records.items():
        assert record["benchmark"] == name
        assert record["machine"]["cores"] >= 1 and record["machine"]["versions"]["torch"]
        assert record["load_average"]["samples"] >= 2 and record["load_average"]["max"] >= 0


def test_loader_reads_every_row_on_every_path(quick_run):
    record = quick_run[0]["loader"]
    rows = {r["path"]: r["rows"] for r in record["results"]}
    assert rows[loader.PATHS[0][0]] == 4096
    assert rows["dlpipe `ArrowLoader`, world 1 (shuffled)"] == 4096
    assert rows["dlpipe `ArrowLoader`, rank 0 of world 2 (its half)"] == 2048
    assert record["results"][0]["vs_raw_scan"] == 1.0


def test_scoring_scores_every_row_of_both_models_at_each_size(quick_run):
    record = quick_run[0]["scoring"]
    sizes = {model["model"]: model["sizes"] for model in record["models"]}
    assert [s["rows"] for s in sizes["cnn"]] == [2048] and [s["rows"] for s in sizes["autoencoder"]] == [1024, 2048]
    for model in sizes.values():
        for size in model:
            for result in size["results"].values():
                assert [count for _, count, _ in result["runs"]] == [size["rows"]]
    small, large = sizes["autoencoder"]
    assert len(small["results"]) == 4 and small["dlpipe_vs_spark_udf"] > 0  # spark_udf up to --udf-rows only
    assert scoring.PATHS[3] not in large["results"] and "dlpipe_vs_spark_udf" not in large
    limits = [sizes["cnn"][0]["results"][path]["vs_lower_limit"] for path in scoring.PATHS[:2]]
    assert min(limits) == 1.0  # each path is reported against the slower of the two limits


def test_etl_engines_agree_on_every_count(quick_run):
    record = quick_run[0]["etl"]
    counts = {r["engine"]: r["counts"] for r in record["results"]}
    assert set(counts) == {*etl.ENGINES, *etl.FLOORS}
    for floor in etl.FLOORS:
        assert counts.pop(floor) == {"rows_in": 2000}, floor  # a floor reads (and writes) every row, checks nothing
    for engine, c in counts.items():
        assert c["rows_in"] == 2000, engine
        assert c["rows_quarantined"] == 5, engine  # one row per planted problem kind
        assert c["rows_clean"] + c["rows_quarantined"] == c["rows_in"], engine
        assert c["train"] + c["val"] + c["test"] == c["rows_clean"], engine
        assert 0.6 < c["train"] / c["rows_clean"] < 0.8, engine
    spark = next(r for r in record["results"] if r["engine"] == "dlpipe-spark")
    assert spark["dlpipe_rows_per_s_ratio"] == 1.0 and spark["peak_memory_mb"] > 100  # the JVM was sampled


def test_training_runs_each_path_and_world_size(quick_run):
    record = quick_run[0]["training"]
    cases = {(r["world_size"], r["source"]): r for r in record["results"]}
    assert set(cases) == {(1, "memory"), (1, "arrow"), (2, "memory"), (2, "arrow")}
    batch = record["results"][0]["batch_size"]
    for (world, _), result in cases.items():
        run = result["runs"][0]
        assert run["samples"] == 512  # one timed epoch over every row, all ranks together
        assert run["steps_per_rank"] == -(-512 // world // batch)
        assert 0.0 <= result["data_wait_fraction"] < 1.0
    assert cases[1, "memory"]["vs_in_memory"] == 1.0 and cases[2, "arrow"]["vs_world_1"] > 0


def test_report_renders_every_record_and_one_from_another_machine(quick_run, tmp_path):
    records, text, doc = quick_run
    assert doc.read_text() == text
    for module in (loader, scoring, etl, training):
        assert text.count(f"## {module.TITLE}") == 1 and module.METHOD.strip() in text
        assert module.markdown_table(records[module.__name__.split(".")[-1]]) in text
    gpu = {**records["training"], "machine": {**records["training"]["machine"], "gpu": "NVIDIA H100 80GB HBM3"}}
    for name, record in {**records, "training-h100": gpu}.items():
        report.save(record, tmp_path / f"{name}.json")
    rendered = report.render(tmp_path)
    assert rendered.count("### Run of ") == 5
    training_section = rendered.split(f"## {training.TITLE}")[1].split("\n## ")[0]
    assert training_section.count("### Run of ") == 2 and "on NVIDIA H100 80GB HBM3" in training_section


def test_a_failed_training_job_reports_the_ranks_own_error_first(tmp_path):
    args = argparse.Namespace(backend="gloo", epochs=1, batch_size=None, threads_per_rank=1)
    with pytest.raises(RuntimeError) as failed:
        training.run_once(tmp_path / "missing", "arrow", 1, "off", args)
    detail = str(failed.value).split("\n")
    assert detail[0].startswith("training benchmark job failed")
    # the rank's own message, not torchrun's ChildFailedError
    assert detail[1] == f"[rank0]: FileNotFoundError: {tmp_path / 'missing'}: no Parquet files"


# A parent holding 400 MB forks a child that only sleeps: RSS counts the shared pages twice, PSS once.
_PARENT_AND_FORKED_CHILD = """
import os, time
block = bytearray(400 * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
child = os.fork()
if child == 0:
    time.sleep(1.5)
    os._exit(0)
os.waitpid(child, 0)
"""


@pytest.mark.parametrize("proportional", [False, True])
def test_peak_memory_of_a_tree_counts_pages_a_forked_child_shares_once_only_when_proportional(proportional):
    process = subprocess.Popen([sys.executable, "-c", _PARENT_AND_FORKED_CHILD])
    with PeakRss(process.pid, proportional=proportional) as memory:
        process.wait()
    assert process.returncode == 0
    megabytes = memory.peak / 2**20
    if proportional:
        assert 400 < megabytes < 550
    else:
        assert megabytes > 800

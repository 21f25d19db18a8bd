"""`make bench`: run every benchmark in bench/, save each record as JSON, and rewrite BENCHMARKS.md from all records.

    python -m bench [--quick] [--only loader scoring etl training] [--results-dir DIR] [--doc PATH]

Records measured elsewhere (the GPU training runs) stay in bench/results/ untouched and are rendered too.
`--quick` runs tiny sizes into runs/bench/quick/ (records and its own BENCHMARKS.md), leaving the committed ones.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench import etl, loader, report, scoring, training

REPO = Path(__file__).resolve().parents[1]
FULL = {
    "loader": ["--rows", "1000000", "--repeats", "3"],
    "scoring": ["--cnn-rows", "200000", "2000000", "--autoencoder-rows", "1000000", "10000000", "--udf-rows",
                "2000000", "--repeats", "2"],
    "etl": ["--rows", "1000000", "10000000", "--repeats", "3", "--big-repeats", "1"],
    "training": ["--rows", "20000", "--epochs", "2", "--repeats", "3"],
}
QUICK = {
    "loader": ["--rows", "4096", "--repeats", "1"],
    "scoring": ["--cnn-rows", "2048", "--autoencoder-rows", "1024", "2048", "--udf-rows", "1024", "--repeats", "1"],
    "etl": ["--rows", "2000", "--repeats", "1", "--no-low-memory"],
    "training": ["--rows", "512", "--epochs", "1", "--repeats", "1"],
}
MODULES = {"loader": loader, "scoring": scoring, "etl": etl, "training": training}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, into runs/bench/quick/")
    parser.add_argument("--only", nargs="+", choices=list(MODULES), default=list(MODULES))
    parser.add_argument("--results-dir", type=Path, help="default: bench/results (runs/bench/quick with --quick)")
    parser.add_argument("--doc", type=Path, help="default: BENCHMARKS.md (<results-dir>/BENCHMARKS.md with --quick)")
    parser.add_argument("--data-dir", default="runs/bench", help="where generated inputs are cached")
    args = parser.parse_args(argv)
    results = args.results_dir or (REPO / "runs" / "bench" / "quick" if args.quick else report.RESULTS)
    doc = args.doc or (results / "BENCHMARKS.md" if args.quick else REPO / "BENCHMARKS.md")
    sizes = QUICK if args.quick else FULL
    for name in args.only:
        print(f"== {name}", flush=True)
        record = MODULES[name].main([*sizes[name], "--data-dir", str(args.data_dir)])
        report.save(record, results / f"{name}.json")
    text = report.render(results)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    print(f"wrote {doc} from the records in {results}")
    return text


if __name__ == "__main__":
    main()

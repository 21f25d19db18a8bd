"""`make bench`: every benchmark in bench/, one after the other, each printing its side-by-side table.

Full reports (every timing) go to runs/bench/<name>.json; BENCHMARKS.md records the results with their method.
"""
from bench import loader, scoring


def main() -> None:
    loader.main(["--rows", "1000000", "--repeats", "3", "--json", "runs/bench/loader.json"])
    scoring.main(["--rows", "200000", "--repeats", "3", "--json", "runs/bench/scoring.json"])


if __name__ == "__main__":
    main()

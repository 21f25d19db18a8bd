"""The `dlpipe` command: one sub-command per stage, plus `run` (all stages) and `demo`.

Every stage takes a pipeline YAML and optional `key.sub=value` overrides, exits 0 on success and
non-zero with a one-line reason on stderr on failure (codes below).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jobs.config import ConfigError, load_config
from jobs.run import TrainingFailed
from pipelines.errors import DataError
from jobs.stage import configure_logging

EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_TRAINING = 4

EPILOG = """exit codes: 0 ok, 2 bad config, 3 bad or insufficient data, 4 training failed.
examples:
  dlpipe sample digits --out data/raw/digits
  dlpipe validate conf/digits_cnn.yaml train.epochs=5
  dlpipe run conf/digits_cnn.yaml train.epochs=5
  dlpipe score conf/digits_cnn.yaml --model models:/digits-cnn/1 --input runs/digits-cnn/dataset/split=test
"""


def _cmd_sample(args: argparse.Namespace) -> None:
    from jobs.sample import SAMPLES

    count = SAMPLES[args.name](Path(args.out))
    print(f"wrote {count} files of sample '{args.name}' to {args.out}")


def _cmd_validate(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    print(cfg.to_yaml(), end="")
    print(f"# {args.config}: valid", file=sys.stderr)


def _cmd_etl(args: argparse.Namespace) -> None:
    from jobs.etl import run_etl

    run_etl(load_config(args.config, args.overrides))


def _cmd_train(args: argparse.Namespace) -> None:
    from jobs.train import launch

    cfg = load_config(args.config, args.overrides)
    code = launch(args.config, args.overrides, cfg.train.world_size)
    if code:
        raise TrainingFailed(f"training exited with code {code} (see the rank logs above)")


def _cmd_score(args: argparse.Namespace) -> None:
    from jobs.score import run_score

    cfg = load_config(args.config, args.overrides)
    run_score(cfg, model_uri=args.model, input_path=args.input, output_path=args.output)


def _cmd_run(args: argparse.Namespace) -> None:
    from jobs.run import run_pipeline

    report = run_pipeline(args.config, args.overrides)
    print(report.as_text())


def _cmd_demo(args: argparse.Namespace) -> None:
    from jobs.run import run_demo

    report = run_demo(args.config, args.overrides)
    print(report.as_text())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for `dlpipe` and all its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="dlpipe",
        description="Spark ETL -> PyTorch DDP training -> MLflow registry -> Spark batch scoring.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sample = commands.add_parser("sample", help="write a packaged data set as raw files (e.g. digits as PNGs)")
    sample.add_argument("name", choices=["digits"], help="which data set")
    sample.add_argument("--out", required=True, help="folder to write into")
    sample.set_defaults(handler=_cmd_sample)

    def stage_parser(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("config", help="pipeline YAML, e.g. conf/digits_cnn.yaml")
        sub.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
        sub.set_defaults(handler=handler)
        return sub

    stage_parser("validate", "check a config (and overrides) and print the resolved YAML; runs nothing", _cmd_validate)
    stage_parser("etl", "Spark ETL: ingest, quarantine, split, normalize, write the Parquet dataset", _cmd_etl)
    stage_parser("train", "DDP training via torchrun (train.world_size processes); registers the model", _cmd_train)
    score = stage_parser("score", "Spark batch scoring of a registered model over Parquet", _cmd_score)
    score.add_argument("--model", help="model URI (default: score.model_uri or models:/NAME/latest)")
    score.add_argument("--input", type=Path, help="Parquet to score (default: the test split)")
    score.add_argument("--output", type=Path, help="where predictions go (default: <run_dir>/predictions)")
    stage_parser("run", "all stages in order: etl -> train -> score", _cmd_run)
    demo = commands.add_parser("demo", help="write the sample data, run every stage, print the test report")
    demo.add_argument("config", nargs="?", default="conf/digits_cnn.yaml", help="pipeline YAML")
    demo.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `dlpipe` command; return its exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        args.handler(args)
    except ConfigError as exc:
        print(f"dlpipe: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DataError as exc:
        print(f"dlpipe: data error: {exc}", file=sys.stderr)
        return EXIT_DATA
    except TrainingFailed as exc:
        print(f"dlpipe: training failed: {exc}", file=sys.stderr)
        return EXIT_TRAINING
    return 0


if __name__ == "__main__":
    sys.exit(main())

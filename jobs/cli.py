"""The `dlpipe` command: one sub-command per stage, plus `run` (all stages) and `demo`.

Every stage takes a pipeline YAML and optional `key.sub=value` overrides, exits 0 on success and
non-zero with a one-line reason on stderr on failure (codes below).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from jobs.config import ConfigError, load_config
from jobs.run import STAGES
from jobs.stage import LOG_FORMAT_ENV, LOG_FORMATS, configure_logging, log_format
from jobs.termination import raise_on_stop_signals, settle, stop_exit_code, stop_requested

EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_TRAINING = 4
EXIT_TRACKING = 5
EXIT_PROMOTION = 6
EXIT_LOCKED = 7

EPILOG = """exit codes: 0 ok, 2 bad config, 3 bad or insufficient data (or an upstream stage not complete,
  or the model to score is not in the registry),
  4 training failed, 5 MLflow tracking/registry unavailable, 6 promotion failed (candidate unusable),
  7 the pipeline is already running, or another job is writing the same output (lock held),
  143 stopped by SIGTERM (its MLflow run ended, staging folders and torchrun's ranks cleaned up).
examples:
  dlpipe sample digits --out data/raw/digits
  dlpipe validate conf/digits_cnn.yaml train.epochs=5
  dlpipe run conf/digits_cnn.yaml train.epochs=5          # skips stages whose inputs and config are unchanged
  dlpipe run conf/digits_cnn.yaml --from train --force
  dlpipe score conf/digits_cnn.yaml --model models:/digits-cnn/1 --input runs/digits-cnn/dataset/split=test
"""
NEEDS_TRACKING = {"etl", "train", "promote", "score", "run", "demo"}


def _cmd_sample(args: argparse.Namespace) -> None:
    from jobs.sample import SAMPLES

    count = SAMPLES[args.name](Path(args.out))
    print(f"wrote {count} records of sample '{args.name}' to {args.out}")


def _cmd_validate(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    if cfg.model is not None:
        from jobs.promote import gate_settings

        gate_settings(cfg)  # as `dlpipe run` checks it before its ETL
    print(cfg.to_yaml(), end="")
    print(f"# {args.config}: valid", file=sys.stderr)


def _cmd_stage(args: argparse.Namespace) -> None:
    """etl / train / promote / score as one stage of the pipeline: lock, upstream check, completion marker."""
    from jobs.run import run_stages

    markers = run_stages(args.config, args.overrides, only=args.command, force=True)
    if args.command == "promote":
        decision = markers["promote"]["summary"]
        print(f"{decision['model_name']} version {decision['candidate_version']}: {decision['decision']} "
              f"({decision['reason']})")


def _cmd_promote(args: argparse.Namespace) -> None:
    from jobs.promote import run_promote
    from jobs.state import pipeline_lock

    if not (args.version or args.force_promotion):
        return _cmd_stage(args)
    cfg = load_config(args.config, args.overrides)
    with pipeline_lock(cfg):
        decision = run_promote(cfg, version=args.version, force=args.force_promotion)
    print(f"{decision['model_name']} version {decision['candidate_version']}: {decision['decision']} "
          f"({decision['reason']})")


def _cmd_score(args: argparse.Namespace) -> None:
    from jobs.score import run_score

    if not (args.model or args.input or args.output):
        return _cmd_stage(args)
    # an ad-hoc job: it locks its output only (run_score), so jobs writing other outputs run side by side
    run_score(load_config(args.config, args.overrides), model_uri=args.model, input_path=args.input,
              output_path=args.output)


def _cmd_run(args: argparse.Namespace) -> None:
    from jobs.run import run_pipeline

    print(run_pipeline(args.config, args.overrides, start=args.start, only=args.only, force=args.force).as_text())


def _cmd_submit(args: argparse.Namespace) -> None:
    import shlex

    from jobs.submit import build_submit_command, parse_conf, submit

    command = build_submit_command(
        args.stage, args.config, args.overrides, args.master, args.deploy_mode, parse_conf(args.conf),
        dist_dir=args.dist, python=args.python, archive=args.archive,
    )
    if args.print:
        print(shlex.join(command))
        return
    code = submit(command)
    if code:
        raise SystemExit(code)  # client mode: spark-submit exits with the stage's own dlpipe code


def _cmd_demo(args: argparse.Namespace) -> None:
    from jobs.run import run_demo

    print(run_demo(args.config, args.overrides).as_text())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for `dlpipe` and all its sub-commands."""
    from jobs.sample import SAMPLES
    from jobs.submit import SUBMIT_STAGES

    parser = argparse.ArgumentParser(
        prog="dlpipe",
        description="Spark ETL -> PyTorch DDP training -> MLflow registry -> Spark batch scoring.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=LOG_FORMATS, help="text (default) or json: one JSON object per line "
                        f"for schedulers, training ranks included (same as {LOG_FORMAT_ENV}=json)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sample = commands.add_parser("sample", help="write a packaged data set as raw files (e.g. digits as PNGs)")
    sample.add_argument("name", choices=sorted(SAMPLES), help="which data set")
    sample.add_argument("--out", required=True, help="folder to write: new, empty, or written by dlpipe sample before "
                        "(then replaced whole)")
    sample.set_defaults(handler=_cmd_sample)

    def stage_parser(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("config", help="pipeline YAML, e.g. conf/digits_cnn.yaml")
        sub.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
        sub.set_defaults(handler=handler)
        return sub

    stage_parser("validate", "check a config (and overrides) and print the resolved YAML; runs nothing", _cmd_validate)
    stage_parser("etl", "Spark ETL: ingest, quarantine, split, normalize, write the Parquet dataset", _cmd_stage)
    stage_parser("train", "DDP training via torchrun (train.world_size processes); registers the model", _cmd_stage)
    promote = stage_parser("promote", "promotion gate: move `champion` to the new version if it is better", _cmd_promote)
    promote.epilog = ("The metric (promote.metric) is the one each version's training run logged on its test split; "
                      "when the two runs were tested on different datasets, both versions are scored on the current "
                      "test split and compared on that. The decision is tagged on the version (promotion.*).")
    promote.add_argument("--version", help="registry version to judge (default: the one `train` registered)")
    promote.add_argument("--force", dest="force_promotion", action="store_true",
                         help="promote regardless of the metric (still smoke-tested); recorded as forced")
    score = stage_parser("score", "Spark batch scoring of a registered model over Parquet", _cmd_score)
    score.add_argument("--model", help="model URI (default: score.model_uri or models:/NAME@champion)")
    score.add_argument("--input", type=Path, help="Parquet to score (default: the test split)")
    score.add_argument("--output", type=Path, help="where predictions go (default: <run_dir>/predictions)")
    run = stage_parser("run", "all stages in order: etl -> train -> promote -> score, skipping unchanged ones",
                       _cmd_run)
    selection = run.add_mutually_exclusive_group()
    selection.add_argument("--from", dest="start", choices=STAGES, help="start at this stage")
    selection.add_argument("--only", choices=STAGES, help="run just this stage")
    run.add_argument("--force", action="store_true", help="rerun selected stages even when up to date")
    sub = commands.add_parser("submit", help="run a stage on a cluster with spark-submit (or --print the command)")
    sub.add_argument("stage", choices=SUBMIT_STAGES)
    sub.add_argument("config", help="pipeline YAML")
    sub.add_argument("overrides", nargs="*", metavar="key.sub=value")
    sub.add_argument("--master", required=True, help="spark://HOST:PORT, yarn, k8s://https://HOST:PORT")
    sub.add_argument("--deploy-mode", choices=["client", "cluster"], default="client")
    sub.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="extra Spark conf (repeatable)")
    sub.add_argument("--python", help="executors' Python (default: this one, same path on every node)")
    sub.add_argument("--archive", help="packed virtualenv shipped with --archives (executors use ./environment/bin/python)")
    sub.add_argument("--dist", default="dist", help="where dlpipe.zip and the driver script are written")
    sub.add_argument("--print", action="store_true", help="print the spark-submit command instead of running it")
    sub.set_defaults(handler=_cmd_submit)
    demo = commands.add_parser("demo", help="write the sample data, run every stage, print the test report")
    demo.add_argument("config", nargs="?", default="conf/digits_cnn.yaml", help="pipeline YAML")
    demo.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `dlpipe` command; return its exit code."""
    args = build_parser().parse_args(argv)  # before the heavy imports: `--help` stays instant

    from dl.promotion import PromotionError
    from dl.registry import ModelNotFound
    from jobs.run import TrainingFailed
    from jobs.state import StageIncomplete
    from jobs.tracking import TrackingUnavailable, require_tracking
    from pipelines.atomic import LockHeld
    from pipelines.errors import DataError

    if args.log_format:
        os.environ[LOG_FORMAT_ENV] = args.log_format  # inherited by torchrun and its ranks
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    failures = (
        (ConfigError, EXIT_CONFIG, "config error"),
        (DataError, EXIT_DATA, "data error"),
        (StageIncomplete, EXIT_DATA, "missing input"),
        (ModelNotFound, EXIT_DATA, "model not found"),
        (TrainingFailed, EXIT_TRAINING, "training failed"),
        (TrackingUnavailable, EXIT_TRACKING, "tracking unavailable"),
        (PromotionError, EXIT_PROMOTION, "promotion failed"),
        (LockHeld, EXIT_LOCKED, "locked"),  # the pipeline's lock, or an output's
    )
    with raise_on_stop_signals():
        try:
            if args.command in NEEDS_TRACKING:
                require_tracking(load_config(args.config, args.overrides).tracking_uri)
            args.handler(args)
        except BaseException as exc:
            settle()
            failure = next(((code, label, exc) for kind, code, label in failures if isinstance(exc, kind)), None)
            if stop_requested():  # `Terminated`, or whatever error the stopped Spark session raised first
                failure = (stop_exit_code(), "terminated", stop_requested())
            if failure is None:
                raise
            _report_failure(*failure)
            return failure[0]
    return 0


def _report_failure(code: int, label: str, reason) -> None:
    """The failure's one line on stderr (a JSON object with `--log-format json`)."""
    if log_format() == "json":
        print(json.dumps({"level": "ERROR", "logger": "dlpipe", "message": f"{label}: {reason}", "failure": label,
                          "exit_code": code}), file=sys.stderr)
    else:
        print(f"dlpipe: {label}: {reason}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""Config loading: typed values, overrides, and errors that name the file and the key."""
import json
import re
from pathlib import Path

import pytest
import yaml

from jobs.config import DEFAULT_TOKEN_PATTERN, ConfigError, load_config, parse_override

DIGITS = Path(__file__).resolve().parents[1] / "conf" / "digits_cnn.yaml"


def write_config(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(DIGITS.read_text())
    mutate(data)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_digits_config_loads_with_typed_values():
    cfg = load_config(DIGITS)
    assert cfg.name == "digits-cnn"
    assert cfg.source.image_size == (8, 8)
    assert cfg.train.world_size == 2
    assert cfg.split.train + cfg.split.val + cfg.split.test == pytest.approx(1.0)
    assert cfg.tracking_uri.startswith("sqlite:///") and cfg.tracking_uri.endswith("runs/digits-cnn/mlflow.db")
    assert cfg.score_model_uri == "models:/digits-cnn@champion"


def test_overrides_set_nested_values_parsed_as_yaml():
    cfg = load_config(DIGITS, ["train.epochs=3", "train.optimizer.lr=0.01", "model.channels=[8, 16]"])
    assert cfg.train.epochs == 3
    assert cfg.train.optimizer.lr == 0.01
    assert cfg.model.channels == [8, 16]


def test_resolved_yaml_round_trips_to_the_same_config(tmp_path):
    cfg = load_config(DIGITS, ["train.epochs=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write_config(tmp_path, lambda d: d["train"].update(epocs=3))
    with pytest.raises(ConfigError, match=r"pipeline\.yaml.*unknown key 'train\.epocs'"):
        load_config(path)


def test_unknown_key_in_override_is_an_error():
    with pytest.raises(ConfigError, match=r"overrides model\.widht=3.*unknown key 'model\.widht'"):
        load_config(DIGITS, ["model.widht=3"])


def test_spark_settings_are_text_and_an_override_sets_one_dotted_setting(tmp_path):
    settings = {"spark.sql.adaptive.enabled": True, "spark.executor.cores": 2, "spark.memory.fraction": 0.5,
                "spark.app.name": "etl"}
    path = write_config(tmp_path, lambda d: d.setdefault("spark", {}).update(conf=settings))
    cfg = load_config(path, ["spark.conf.spark.eventLog.enabled=false", "spark.conf.spark.executor.cores=4"])
    assert cfg.spark.conf == {"spark.sql.adaptive.enabled": "true", "spark.executor.cores": "4",
                              "spark.memory.fraction": "0.5", "spark.app.name": "etl", "spark.eventLog.enabled": "false"}
    with pytest.raises(ConfigError, match=r"'spark\.conf\.spark\.jars'.*valid string"):  # a list is no setting
        load_config(path, ["spark.conf.spark.jars=[a.jar, b.jar]"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"'train\.batch_size'.*integer"):
        load_config(DIGITS, ["train.batch_size=many"])


def test_missing_required_key_is_named(tmp_path):
    path = write_config(tmp_path, lambda d: d.pop("run_dir"))
    with pytest.raises(ConfigError, match=r"missing required key 'run_dir'"):
        load_config(path)


def test_split_ratios_must_sum_to_one():
    with pytest.raises(ConfigError, match=r"'split'.*sum to 1, got 1\.1"):
        load_config(DIGITS, ["split.train=0.8"])


def test_unknown_model_kind_is_rejected():
    with pytest.raises(ConfigError, match=r"'model'.*'transformer'"):
        load_config(DIGITS, ["model.kind=transformer"])


def test_a_source_holding_the_run_folder_or_inside_an_etl_output_is_refused(tmp_path):
    raw = tmp_path / "raw"
    with pytest.raises(ConfigError, match=rf"'source\.path': {raw} holds run_dir {raw / 'run'}: the ETL would read"):
        load_config(DIGITS, [f"source.path={raw}", f"run_dir={raw / 'run'}"])
    with pytest.raises(ConfigError, match=rf"'source\.path': {raw} holds run_dir {raw}:"):
        load_config(DIGITS, [f"source.path={raw}", f"run_dir={raw}"])
    assert load_config(DIGITS, [f"source.path={raw}", f"run_dir={raw / '_run'}"]).run_dir == raw / "_run"  # unlisted
    inside = tmp_path / "run" / "quarantine" / "raw"
    with pytest.raises(ConfigError, match=rf"'source\.path': {inside} lies inside the quarantine {inside.parent}, "):
        load_config(DIGITS, [f"source.path={inside}", f"run_dir={tmp_path / 'run'}"])
    assert load_config(DIGITS, [f"source.path={tmp_path / 'run' / 'raw'}", f"run_dir={tmp_path / 'run'}"])


def test_a_csv_option_on_a_source_that_is_not_csv_is_a_config_error():
    text = DIGITS.with_name("text_classification.yaml")  # a CSV text source that states multiline: false
    assert load_config(text, ["source.format=json"]).source.file_format == "json"  # defaults are no choice
    with pytest.raises(ConfigError, match=r"source\.encoding is a CSV option; this source reads json \(JSON Lines"):
        load_config(text, ["source.format=json", "source.encoding=latin-1"])
    with pytest.raises(ConfigError, match=r"source\.multiline is a CSV option; this source reads json$"):
        load_config(text, ["source.format=json", "source.multiline=true"])


@pytest.mark.parametrize("override, message", [
    ("spark.master=local[0]", "'spark.master': 'local[0]' is not a Spark master URL"),
    ("spark.master=yarnn", "'spark.master': 'yarnn' is not a Spark master URL"),
    ("spark.driver_memory=lots", "'spark.driver_memory': 'lots' is not a JVM memory size such as 2g or 1536m"),
    ("spark.driver_memory=1gb", "'spark.driver_memory': '1gb' is not a JVM memory size"),  # the JVM's -Xmx refuses it
])
def test_a_spark_master_or_driver_memory_the_jvm_would_refuse_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(DIGITS, [override])
    for good in ("spark.master=local[2]", "spark.master=spark://127.0.0.1:7077", "spark.driver_memory=1536m"):
        load_config(DIGITS, [good])


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)


def test_off_and_no_are_words_not_booleans_in_files_and_overrides(tmp_path):
    # YAML 1.1 reads `off` as False, which made `train.amp=off` and `score.drift.action=off` invalid.
    cfg = load_config(DIGITS, ["train.amp=off", "score.drift.action=off", "train.resume=true"])
    assert (cfg.train.amp, cfg.score.drift.action, cfg.train.resume) == ("off", "off", True)
    assert parse_override("a.b=no") == (["a", "b"], "no") and parse_override("a.b=False") == (["a", "b"], False)
    written = tmp_path / "conf.yaml"
    written.write_text(DIGITS.read_text() + "\ntrain: {amp: off, resume: false}\n")
    assert load_config(written).train.amp == "off"


def test_secrets_come_from_the_environment_and_are_logged_as_written(monkeypatch):
    monkeypatch.setenv("DLPIPE_TEST_SECRET", "hunter2-from-env")
    cfg = load_config(DIGITS, ["mlflow.tracking_uri=http://svc:${DLPIPE_TEST_SECRET}@127.0.0.1:5000",
                               'spark.conf={spark.hadoop.fs.s3a.endpoint: "https://${DLPIPE_TEST_SECRET}.example"}'])
    assert cfg.tracking_uri == "http://svc:hunter2-from-env@127.0.0.1:5000"
    assert cfg.spark.conf["spark.hadoop.fs.s3a.endpoint"] == "https://hunter2-from-env.example"
    logged = json.dumps(cfg.as_params()) + cfg.to_yaml()
    assert "hunter2" not in logged
    assert cfg.as_params()["spark.conf.spark.hadoop.fs.s3a.endpoint"] == "https://${DLPIPE_TEST_SECRET}.example"


def test_an_unset_environment_variable_or_bad_override_yaml_is_a_config_error(monkeypatch):
    monkeypatch.delenv("DLPIPE_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match="'mlflow.tracking_uri' reads environment variable DLPIPE_TEST_UNSET, "
                                          "which is not set"):
        load_config(DIGITS, ["mlflow.tracking_uri=http://${DLPIPE_TEST_UNSET}@h:5000"])
    with pytest.raises(ConfigError, match="the value is not valid YAML"):
        parse_override("spark.conf={a: b")


@pytest.mark.parametrize("text", ["noequals", "=3", "a..b=1"])
def test_malformed_override_is_rejected(text):
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_override(text)


def test_secrets_are_masked_in_everything_that_gets_logged():
    cfg = load_config(DIGITS, [
        "spark.conf={spark.hadoop.fs.s3a.secret.key: hunter2, spark.hadoop.fs.s3a.access.key: AKIA123, "
        "spark.hadoop.fs.s3a.session.token: tok3n, spark.executor.cores: '2'}",
        "mlflow.tracking_uri=https://alice:s3cr3t@mlflow.example.com",
    ])
    params = cfg.as_params()
    assert params["spark.conf.spark.hadoop.fs.s3a.secret.key"] == "***"
    assert params["spark.conf.spark.hadoop.fs.s3a.access.key"] == "***"
    assert params["spark.conf.spark.hadoop.fs.s3a.session.token"] == "***"
    assert params["spark.conf.spark.executor.cores"] == "2"
    assert params["mlflow.tracking_uri"] == "https://***@mlflow.example.com"
    assert params["train.optimizer.lr"] == 0.002
    logged = cfg.to_yaml()
    assert "hunter2" not in logged and "AKIA123" not in logged and "s3cr3t" not in logged and "tok3n" not in logged
    assert cfg.tracking_uri == "https://alice:s3cr3t@mlflow.example.com"  # the job itself still has it


def test_text_settings_named_after_tokens_are_logged_not_masked():
    """`token_pattern` and `min_token_length` are not secrets: lineage must show how the text was split."""
    params = load_config(DIGITS.with_name("text_classification.yaml")).as_params()
    assert params["source.token_pattern"] == DEFAULT_TOKEN_PATTERN
    assert params["source.min_token_length"] == 1


def test_the_ridge_baseline_regresses_on_the_whole_window_unless_told_otherwise(tmp_path):
    seattle = yaml.safe_load(DIGITS.with_name("seattle_weather_rnn.yaml").read_text())
    del seattle["source"]["baseline_lags"]
    path = tmp_path / "series.yaml"
    path.write_text(yaml.safe_dump(seattle))
    assert load_config(path, ["source.window.length=6"]).source.ridge_lags == 6  # a short window needs no lags setting
    assert load_config(path, ["source.window.length=6", "source.baseline_lags=3"]).source.ridge_lags == 3
    with pytest.raises(ConfigError, match="source.baseline_lags 7 exceeds window.length 6"):
        load_config(path, ["source.window.length=6", "source.baseline_lags=7"])


@pytest.mark.parametrize("conf, model, loss", [
    ("digits_cnn.yaml", {"kind": "cnn"}, "cross_entropy"),
    ("seattle_weather_rnn.yaml", {"kind": "rnn", "task": "regression"}, "mse"),
    ("seattle_weather_rnn.yaml", {"kind": "rnn"}, "cross_entropy"),
    ("breast_cancer_anomaly.yaml", {"kind": "autoencoder"}, "mse"),
    ("breast_cancer_anomaly.yaml", {"kind": "mlp", "task": "regression"}, "mse"),
    ("digits_dec.yaml", {"kind": "dec"}, "mse"),
])
def test_without_a_loss_name_the_model_gets_its_task_s_loss(tmp_path, conf, model, loss):
    """A regression or reconstruction model with no train.loss.name gets mse, not cross_entropy (which its task
    refuses); the resolved name is what `dlpipe validate` prints and MLflow logs."""
    data = yaml.safe_load(DIGITS.with_name(conf).read_text())
    data["model"] = model
    data["train"]["loss"] = {"l2": 0.001}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    assert (cfg.train.loss.name, cfg.train.loss.l2) == (loss, 0.001)
    assert cfg.as_params()["train.loss.name"] == loss
    assert load_config(path, ["train.loss.name=huber"]).train.loss.name == "huber"  # a name given is kept

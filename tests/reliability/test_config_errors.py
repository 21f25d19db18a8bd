"""Impossible values and unknown component names in a config: a ConfigError naming the file and the key."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobs.config import ConfigError, load_config
from jobs.run import run_stages

DIGITS = Path(__file__).resolve().parents[2] / "conf" / "digits_cnn.yaml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=-8", r"'train\.batch_size': Input should be greater than 0"),
        ("source.image_size=[0, 8]", r"'source\.image_size\.0': Input should be greater than 0"),
        ("train.optimizer.name=adamax", r"'train\.optimizer\.name': Input should be 'sgd', 'adam'"),
        ("train.loss.name=hinge", r"'train\.loss\.name': Input should be 'cross_entropy'"),
        ("split.val=-0.1", r"'split\.val': Input should be greater than 0"),
    ],
)
def test_impossible_values_and_unknown_names_are_named(override, message):
    with pytest.raises(ConfigError, match=rf"digits_cnn\.yaml \(with overrides {re.escape(override)}\).*{message}"):
        load_config(DIGITS, [override])


@pytest.mark.parametrize("frequency", ["1 month", "0s", "daily"])
def test_a_window_frequency_must_be_a_positive_fixed_duration(frequency):
    weather = DIGITS.parent / "seattle_weather_rnn.yaml"
    with pytest.raises(ConfigError, match=rf"'source\.window\.frequency': '{frequency}' is not a positive fixed "
                                          r"duration such as '1 day', '1h' or '15min'$"):
        load_config(weather, [f"source.window.frequency={frequency}"])


def test_a_promotion_gate_that_cannot_judge_stops_a_run_before_its_etl(tmp_path):
    """The anomaly task does not know which way test_f1 is better: a whole run is refused before the ETL and
    training, not after them."""
    anomaly = DIGITS.parent / "breast_cancer_anomaly.yaml"
    overrides = [f"run_dir={tmp_path / 'run'}", "promote.metric=test_f1", "promote.mode=null"]
    with pytest.raises(ConfigError, match=r"^'promote\.mode': which way is better for promote\.metric 'test_f1'"):
        run_stages(anomaly, overrides)
    assert not (tmp_path / "run").exists()

"""Impossible values and unknown component names in a config: a ConfigError naming the file and the key."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobs.config import ConfigError, load_config

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

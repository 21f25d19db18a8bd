"""Path confinement: with `roots` declared, every config path must resolve inside one of them."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.config import ConfigError, load_config

DIGITS = Path(__file__).resolve().parents[2] / "conf" / "digits_cnn.yaml"


def confined_config(tmp_path: Path, root: Path, **paths) -> Path:
    data = yaml.safe_load(DIGITS.read_text())
    data["roots"] = [str(root)]
    data["run_dir"] = str(root / "run")
    data["source"]["path"] = str(root / "data")
    for key, value in paths.items():
        section, _, name = key.partition("__")
        if name:
            data.setdefault(section, {})[name] = str(value)
        else:
            data[section] = str(value)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture()
def root(tmp_path) -> Path:
    (tmp_path / "root" / "data").mkdir(parents=True)
    return tmp_path / "root"


def test_paths_inside_the_roots_are_allowed(tmp_path, root):
    cfg = load_config(confined_config(tmp_path, root, score__input=root / "data" / ".." / "in",
                                      score__output=root / "out"))
    assert cfg.roots == [root] and cfg.score.input == root / "data" / ".." / "in"


def test_a_dotdot_escape_is_refused_naming_the_key_and_path(tmp_path, root):
    escape = root / "run" / ".." / ".." / "elsewhere"
    path = confined_config(tmp_path, root, score__output=escape)
    with pytest.raises(ConfigError, match=rf"pipeline\.yaml.*'score\.output': {escape} resolves to "
                                          rf"{tmp_path / 'elsewhere'}, outside the declared roots"):
        load_config(path)


def test_a_symlink_escape_is_refused(tmp_path, root):
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(ConfigError, match=rf"'source\.path': {root / 'link' / 'data'} resolves to {outside / 'data'}"):
        load_config(confined_config(tmp_path, root, source__path=root / "link" / "data"))


def test_an_override_cannot_escape_either(tmp_path, root):
    with pytest.raises(ConfigError, match=r"overrides run_dir=/tmp/x.*'run_dir': /tmp/x resolves to"):
        load_config(confined_config(tmp_path, root), ["run_dir=/tmp/x"])


def test_an_image_labels_csv_is_confined_too(tmp_path, root):
    path = confined_config(tmp_path, root)
    assert load_config(path, [f"source.labels.path={root / 'data' / 'labels.csv'}"]).source.labels.path.name == \
        "labels.csv"
    with pytest.raises(ConfigError, match=r"'source\.labels\.path': /tmp/labels\.csv resolves to .* outside the "):
        load_config(path, ["source.labels.path=/tmp/labels.csv"])


def test_without_roots_paths_are_not_confined(tmp_path):
    assert load_config(DIGITS, ["run_dir=/tmp/anywhere"]).roots is None

"""Checkpoints under faults and attack: torn or altered files fall back to the previous one, pickles never run."""
from __future__ import annotations

import logging
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dl.checkpoint import (CheckpointError, digest_path, load_checkpoint, previous_path, read_checkpoint,
                           save_checkpoint)

ROOT = Path(__file__).resolve().parents[2]


class WritesMarker:
    """Unpickling this runs `Path(marker).write_text(...)`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def write_malicious(path: Path, marker: Path) -> None:
    """A real torch checkpoint (zip) whose pickle would create `marker` if it were unpickled unrestricted."""
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": WritesMarker(marker)}, path)


def two_checkpoints(folder: Path) -> Path:
    last = folder / "last.pt"
    save_checkpoint({"step": 1, "w": torch.full((1000,), 1.0)}, last)
    save_checkpoint({"step": 2, "w": torch.full((1000,), 2.0)}, last)
    return last


def test_each_save_keeps_the_one_it_replaces(tmp_path):
    last = two_checkpoints(tmp_path)
    assert load_checkpoint(last)["step"] == 2
    assert read_checkpoint(previous_path(last))["step"] == 1
    assert previous_path(last).name == "last.prev.pt" and digest_path(last).is_file()
    assert not list(tmp_path.glob(".*tmp*")), "no staging file is left behind"


def test_a_truncated_last_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog):
    last = two_checkpoints(tmp_path)
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # half-written, as after a crash without the atomic rename

    with pytest.raises(CheckpointError, match=f"checkpoint {last} is corrupt"):
        read_checkpoint(last)
    digest_path(last).unlink()  # without the digest the torn zip itself is detected
    with pytest.raises(CheckpointError, match=f"checkpoint {last} cannot be read"):
        read_checkpoint(last)
    with caplog.at_level(logging.WARNING, logger="dl.checkpoint"):
        state = load_checkpoint(last)
    assert state["step"] == 1 and torch.equal(state["w"], torch.full((1000,), 1.0))
    assert str(last) in caplog.text and str(previous_path(last)) in caplog.text


def test_a_flipped_byte_is_caught_by_the_digest(tmp_path):
    last = two_checkpoints(tmp_path)
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # torch.load itself would read this silently
    last.write_bytes(bytes(data))
    assert load_checkpoint(last)["step"] == 1


def test_an_empty_last_and_no_previous_is_a_clear_error(tmp_path):
    last = tmp_path / "last.pt"
    last.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"checkpoint {last} cannot be read"):
        load_checkpoint(last)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_fresh_first_save_forgets_a_stale_previous_checkpoint(tmp_path):
    last = two_checkpoints(tmp_path)
    last.unlink()  # a fresh run removes last.pt (dl/trainer.py); an older run's last.prev.pt must not come back
    save_checkpoint({"step": 9}, last)
    assert not previous_path(last).exists()


def test_a_malicious_pickle_at_a_checkpoint_path_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    last = tmp_path / "last.pt"
    write_malicious(last, marker)

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(last, weights_only=True)
    with pytest.raises(CheckpointError, match=f"checkpoint {last} cannot be read: Weights only load failed"):
        load_checkpoint(last)
    assert not marker.exists()
    torch.load(last, weights_only=False)  # the control: unrestricted unpickling does run it
    assert marker.read_text() == "pwned"


def test_a_malicious_last_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    marker = tmp_path / "marker.txt"
    last = two_checkpoints(tmp_path)
    write_malicious(last, marker)
    assert load_checkpoint(last)["step"] == 1
    assert not marker.exists()


def test_the_serving_model_refuses_a_malicious_weights_file(tmp_path):
    from dl.serving import ServingModel

    marker = tmp_path / "marker.txt"
    weights = tmp_path / "weights.pt"
    write_malicious(weights, marker)
    model = ServingModel({"kind": "mlp", "hidden": [4]}, [3], ["a", "b"],
                         {"method": "zscore", "per": "feature", "group_size": 1, "offset": [0.0] * 3, "scale": [1.0] * 3})
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        model.load_weights(weights)
    assert not marker.exists()


def test_a_full_disk_fails_the_write_clearly_and_keeps_the_last_checkpoint(tmp_path):
    last = two_checkpoints(tmp_path)
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from dl.checkpoint import CheckpointError, save_checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            save_checkpoint({{"step": 3, "w": torch.zeros(1_000_000)}}, Path({str(last)!r}))
        except CheckpointError as exc:
            print("ERROR", exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ERROR could not write checkpoint {last}:")
    assert load_checkpoint(last)["step"] == 2 and read_checkpoint(last)["step"] == 2
    assert not list(tmp_path.glob(".*tmp*"))

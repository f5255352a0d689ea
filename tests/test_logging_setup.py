"""What the programs' logs drop (library probe noise that reports no fault) and keep (real warnings), and progress
off a terminal as a few log lines with an ETA."""

import logging

import pytest

from cpm_jax import logging_setup

SITE = "/venv/lib/python3.11/site-packages/"


def record(path, level, message):
  return logging.LogRecord("x", level, SITE + path, 1, message, (), None)


@pytest.mark.parametrize("path,level,message,noise", [
    ("orbax/checkpoint/checkpoint_manager.py", logging.WARNING,
     "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.", True),
    ("orbax/checkpoint/checkpoint_manager.py", logging.WARNING, "Given directory is read only=/w/checkpoints", True),
    ("orbax/checkpoint/checkpoint_manager.py", logging.WARNING, "Checkpoint step 3 is incomplete", False),
    ("tensorflow_datasets/core/utils/file_utils.py", logging.WARNING,
     "Variant folder /d/peoples_daily_1998/1.0.0 has no dataset_info.json", True),
    ("tensorflow_datasets/core/utils/file_utils.py", logging.WARNING, "Variant folder /d/x has invalid version y",
     False),
    ("tensorflow_datasets/core/dataset_builder.py", logging.INFO, "Reusing dataset review_sentiment (/d)", True),
    ("tensorflow_datasets/core/dataset_builder.py", logging.ERROR, "Failed to build", False),
    ("jax/_src/xla_bridge.py", logging.INFO,
     "Unable to initialize backend 'tpu': libtpu.so: cannot open shared object file", True),
])
def test_probe_noise_is_dropped_and_real_faults_kept(path, level, message, noise):
  assert logging_setup.is_probe_noise(record(path, level, message)) == noise


def test_progress_off_a_terminal_is_a_few_lines_with_an_eta(caplog, monkeypatch):
  monkeypatch.setattr(logging_setup, "is_terminal", lambda: False)
  with caplog.at_level(logging.INFO):
    assert list(logging_setup.progress(range(10), desc="scoring", total=10, unit="batches", lines=2)) == list(range(10))
  lines = [r.getMessage() for r in caplog.records]
  assert lines[0].startswith("scoring: 5/10 batches") and "ETA 00:00:00" in lines[0]
  assert len(lines) == 2 and lines[1].startswith("scoring: 10 batches in ")
  caplog.clear()
  assert list(logging_setup.progress(iter("ab"), desc="x", enabled=False)) == ["a", "b"] and not caplog.records

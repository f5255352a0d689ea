"""Preemption: SIGTERM to a real training process finishes the step, saves it, waits and exits 0; a second SIGTERM
during that save does not corrupt the checkpoint."""

import os
import signal
import subprocess
import sys
import time

import pytest

import _train_run
from _train_run import compilation_cache  # noqa: F401  (fixture)
from cpm_jax import checkpointing

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _wait_for_steps(process, record, steps, log, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      pytest.fail(f"training exited early ({process.returncode}):\n{log.read_text()[-3000:]}")
    if record.exists() and len(_train_run.read_record(record)[0]) >= steps:
      return
    time.sleep(0.2)
  pytest.fail(f"no {steps} training steps within {timeout}s:\n{log.read_text()[-3000:]}")


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
  record, log = tmp_path / "record.jsonl", tmp_path / "log.txt"
  env = dict(os.environ, CPM_TEST_RECORD=str(record), CPM_TEST_SIGTERM_DURING_SAVE="1")
  command = [sys.executable, _train_run.__file__, f"--workdir={tmp_path}", "--gin_bindings=train.num_steps = 100000",
             "--gin_bindings=Checkpointer.save_interval_steps = 100000"]
  with open(log, "w") as output:
    process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
  try:
    _wait_for_steps(process, record, 2, log)
    process.send_signal(signal.SIGTERM)
    returncode = process.wait(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  text = log.read_text()
  assert returncode == 0, text[-3000:]
  losses, _, entries = _train_run.read_record(record)
  stopped = max(losses)
  assert sorted(losses) == list(range(1, stopped + 1)) and stopped < 100000
  assert f"Preempted: saved step {stopped} to" in text
  assert {"second_sigterm_during_save_of_step": stopped} in entries  # sent while the save was being written

  checkpoints = tmp_path / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir()) == [str(stopped)]  # complete, no temporary leftovers
  assert (checkpoints / str(stopped) / "data" / "process_0-of-1.json").exists()
  assert checkpointing.Checkpointer(checkpoints).latest_step() == stopped
  assert int(_train_run.restore_state(checkpoints).step) == stopped

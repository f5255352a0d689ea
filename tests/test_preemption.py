"""Preemption and Ctrl-C: SIGINT (or SIGTERM) to a real training process finishes the step, saves it, waits and exits
(SIGINT: 130, SIGTERM: 0, see test_multihost); a second SIGTERM during that save does not corrupt the checkpoint, a
second SIGINT aborts it and leaves the last complete checkpoint the one that is restored."""

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


def _train_until(tmp_path, steps, first_signal, signal_during_save):
  """A training process sent `first_signal` once it has done `steps` steps; (exit status, log, record)."""
  record, log = tmp_path / "record.jsonl", tmp_path / "log.txt"
  env = dict(os.environ, CPM_TEST_RECORD=str(record), CPM_TEST_SIGNAL_DURING_SAVE=signal_during_save)
  command = [sys.executable, _train_run.__file__, f"--workdir={tmp_path}", "--gin_bindings=train.num_steps = 100000",
             "--gin_bindings=Checkpointer.save_interval_steps = 3"]
  with open(log, "w") as output:
    process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
  try:
    _wait_for_steps(process, record, steps, log)
    process.send_signal(first_signal)
    returncode = process.wait(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  return returncode, log.read_text(), record


def test_ctrl_c_saves_the_current_step_and_exits_130(tmp_path):
  returncode, text, record = _train_until(tmp_path, 2, signal.SIGINT, "SIGTERM")
  assert returncode == 130, text[-3000:]
  losses, _, entries = _train_run.read_record(record)
  stopped = max(losses)
  assert sorted(losses) == list(range(1, stopped + 1)) and stopped < 100000
  assert "Ctrl-C: finishing this step, then saving it" in text and f"Interrupted: saved step {stopped} to" in text
  assert {"SIGTERM_during_save_of_step": stopped} in entries  # sent while the save was being written: harmless
  assert "Traceback" not in text and "KeyboardInterrupt" not in text

  checkpoints = tmp_path / "checkpoints"
  periodic = [str(step) for step in range(3, stopped, 3)]
  assert sorted(p.name for p in checkpoints.iterdir()) == sorted([*periodic, str(stopped)])  # no temporary leftovers
  assert (checkpoints / str(stopped) / "data" / "shard_0-of-1.json").exists()
  assert checkpointing.Checkpointer(checkpoints).latest_step() == stopped
  assert int(_train_run.restore_state(checkpoints).step) == stopped


def test_second_ctrl_c_during_the_save_aborts_it_and_keeps_the_last_complete_checkpoint(tmp_path):
  returncode, text, record = _train_until(tmp_path, 4, signal.SIGTERM, "SIGINT")
  assert returncode == 130, text[-3000:]
  losses, _, entries = _train_run.read_record(record)
  stopped = max(losses)
  saved = {entry["saved"]: entry["params_sha1"] for entry in entries if "saved" in entry}
  assert {"SIGINT_during_save_of_step": stopped} in entries
  last_complete = max(step for step in saved if step < stopped)
  assert text.strip().splitlines()[-1] == (
      f"_train_run.py: interrupted again at step {stopped}: the run stopped without saving it (a save left "
      "half-written is never restored); the latest complete checkpoint in "
      f"{tmp_path / 'checkpoints'} is step {last_complete}.")
  checkpoints = tmp_path / "checkpoints"
  assert checkpointing.Checkpointer(checkpoints).latest_step() == last_complete
  assert not (checkpoints / str(stopped)).exists()
  restored = _train_run.restore_state(checkpoints)
  assert int(restored.step) == last_complete and _train_run.params_sha1(restored.params) == saved[last_complete]


def test_nested_guards_pass_a_stop_outwards_and_a_later_training_does_not_start(tmp_path):
  """A program running several trainings holds a guard around them: SIGTERM during one training reaches that guard
  when the training's own guard closes, and a training started after a stop request returns before its first step."""
  default = signal.getsignal(signal.SIGTERM)
  with checkpointing.PreemptionGuard() as outer:
    with checkpointing.PreemptionGuard() as inner:
      os.kill(os.getpid(), signal.SIGTERM)
      assert inner.requested and not outer.requested
    assert outer.requested and outer.signal_name == "SIGTERM"
    with checkpointing.PreemptionGuard() as later:
      assert later.requested and later.signal_name == "SIGTERM"
    record = tmp_path / "record.jsonl"
    metrics = _train_run.run(tmp_path / "run", record)
    assert metrics == {"preempted_at_step": 0}
    assert not record.exists() or not _train_run.read_record(record)[0]  # no step was taken
    assert checkpointing.Checkpointer(tmp_path / "run" / "checkpoints").latest_step() is None
  assert signal.getsignal(signal.SIGTERM) == default

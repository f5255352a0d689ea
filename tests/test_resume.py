"""Exact resume: a run stopped (cleanly, or by SIGKILL while a checkpoint is being written) and resumed matches
an uninterrupted run bitwise on CPU: per-step losses, the batches in order, and the final state."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import _train_run
from _train_run import compilation_cache  # noqa: F401  (fixture)
from cpm_jax import checkpointing

pytestmark = pytest.mark.usefixtures("compilation_cache")
STEPS = 10


def _assert_states_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """10 uninterrupted steps (run once per session): (losses by step, batch fingerprints, final state, workdir)."""
  workdir = _train_run.session_root(tmp_path_factory) / "resume_reference"
  with _train_run.session_lock(tmp_path_factory, "resume_reference"):
    if not (workdir / "done").exists():
      shutil.rmtree(workdir, ignore_errors=True)
      _train_run.run(workdir, workdir / "record.jsonl", [f"train.num_steps = {STEPS}"])
      (workdir / "done").touch()
  losses, batches, _ = _train_run.read_record(workdir / "record.jsonl")
  assert sorted(losses) == list(range(1, STEPS + 1)) and len(batches) == STEPS
  assert len(set(batches)) == STEPS  # every step trains on a different batch
  return losses, batches, _train_run.restore_state(workdir / "checkpoints"), workdir


def test_stop_after_5_and_resume_is_bitwise_identical(tmp_path, reference):
  losses, batches, final_state, _ = reference
  record = tmp_path / "record.jsonl"
  _train_run.run(tmp_path, record, ["train.num_steps = 5"])
  assert checkpointing.Checkpointer(tmp_path / "checkpoints").latest_step() == 5
  _train_run.run(tmp_path, record, [f"train.num_steps = {STEPS}"])
  resumed_losses, resumed_batches, _ = _train_run.read_record(record)
  assert resumed_batches == batches  # the same data order: no batch skipped or repeated
  assert resumed_losses == losses  # float equality of every step's loss
  _assert_states_equal(_train_run.restore_state(tmp_path / "checkpoints"), final_state)


def test_sigkill_while_a_checkpoint_is_written_then_resume_matches(tmp_path, reference):
  losses, batches, final_state, _ = reference
  record = tmp_path / "record.jsonl"
  env = dict(os.environ, CPM_TEST_RECORD=str(record), CPM_TEST_KILL_AFTER_SAVE="6")
  killed = subprocess.run([sys.executable, str(pathlib.Path(_train_run.__file__)), f"--workdir={tmp_path}",
                           f"--gin_bindings=train.num_steps = {STEPS}"], env=env, capture_output=True, text=True,
                          timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  killed_losses, _, _ = _train_run.read_record(record)
  # Killed right after step 6's save started: step 6's loss would have been read once step 7 was queued.
  assert sorted(killed_losses) == list(range(1, 6))
  names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  assert "3" in names and "6" not in names and any(name.startswith("6.orbax-checkpoint-tmp") for name in names)

  record.unlink()
  _train_run.run(tmp_path, record, [f"train.num_steps = {STEPS}"])  # resumes from step 3, the last complete one
  resumed_losses, resumed_batches, _ = _train_run.read_record(record)
  assert resumed_batches == batches[3:]
  assert resumed_losses == {step: losses[step] for step in range(4, STEPS + 1)}
  _assert_states_equal(_train_run.restore_state(tmp_path / "checkpoints"), final_state)


def test_restore_step_and_init_params_from(tmp_path, reference):
  losses, batches, _, reference_dir = reference
  # --restore_step: resume from step 6 of a copy of the reference run, not from its latest step (10).
  workdir = tmp_path / "restore_step"
  (workdir / "checkpoints").mkdir(parents=True)
  for step in ("3", "6", "9", "10"):
    os.symlink(reference_dir / "checkpoints" / step, workdir / "checkpoints" / step)
  record = tmp_path / "restore_step.jsonl"
  _train_run.run(workdir, record, ["train.num_steps = 8"], restore_step=6)
  resumed_losses, resumed_batches, _ = _train_run.read_record(record)
  assert resumed_losses == {7: losses[7], 8: losses[8]} and resumed_batches == batches[6:8]
  with pytest.raises(FileNotFoundError, match=r"No checkpoint for step 4 .* complete checkpoints: \[3, 6, 8, 9, 10\]"):
    _train_run.run(workdir, record, [], restore_step=4)

  # --init_params_from: step 6's params with a fresh optimizer and step count. The first step's learning rate is 0
  # (warm-up), so after it the params are still exactly the imported ones while the optimizer has seen 1 update.
  step6 = _train_run.restore_state(reference_dir / "checkpoints", step=6)
  checkpointing.save_params(tmp_path / "export", step6.params, {"note": "step 6"})
  workdir = tmp_path / "init_params"
  _train_run.run(workdir, tmp_path / "init_params.jsonl", ["train.num_steps = 1"],
                 init_params_from=str(tmp_path / "export"))
  state = _train_run.restore_state(workdir / "checkpoints")
  assert int(state.step) == 1 and int(state.opt_state[1][0].count) == 1
  _assert_states_equal(state.params, step6.params)

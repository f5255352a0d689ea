"""Multi-host training over jax.distributed on CPU: 2 processes x 4 devices (gloo) against 1 process x 8 devices.

One run hops across topologies and is compared with a 1-process run of the same steps on the same global batches
(its 2 data shards side by side), step by step (#15: resume on another topology):
- 2 steps on 1 process x 8 devices (2 data shards), checkpointed;
- resumed on 2 processes x 4 devices, each reading one shard; stopped by Ctrl-C (SIGINT) to process 1 only, which
  passes it to JAX's preemption service as a SIGTERM: both processes stop and save at the same step (process 1
  exits 130 as a Ctrl-C'd run does, process 0 0 as a preempted one). That checkpoint is written cooperatively, one
  data-iterator state per data shard;
- restored on 1 process x 8 devices (the params the 2 processes held) and resumed there for 3 more steps.
The losses, global batches, evaluations and params agree with the 1-process run: bitwise on the 1-process legs,
to float rounding on the 2-process one (gloo sums in another order); nothing is skipped or repeated.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import _train_run
from _train_run import compilation_cache  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, tmp_path, port):
  env = dict(os.environ, XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                          os.environ.get("XLA_FLAGS", "")) + " --xla_force_host_platform_device_count=4")
  processes = []
  for index in range(2):
    with open(tmp_path / f"log_{index}.txt", "w") as log:
      processes.append(subprocess.Popen(
          [sys.executable, _train_run.__file__, "--distributed", f"--coordinator_address=localhost:{port}",
           "--num_processes=2", f"--process_id={index}", f"--workdir={workdir}",
           "--gin_bindings=train.num_steps = 100000", "--gin_bindings=Checkpointer.save_interval_steps = 2",
           "--gin_bindings=train.eval_every = 2"],
          env=dict(env, CPM_TEST_RECORD=str(tmp_path / f"record_{index}.jsonl")), stdout=log,
          stderr=subprocess.STDOUT))
  return processes


def _logs(tmp_path):
  return [(tmp_path / f"log_{index}.txt").read_text() for index in range(2)]


def test_one_process_then_two_then_one_matches_one_process_throughout(tmp_path):
  workdir = tmp_path / "hopping"
  start = 2  # steps on 1 process x 8 devices, in 2 data shards, before the 2 processes take over
  _train_run.run(workdir, tmp_path / "first.jsonl", [f"train.num_steps = {start}", "train.data_shards = 2",
                                                     "Checkpointer.save_interval_steps = 2", "train.eval_every = 2"])
  first_losses, first_batches, _ = _train_run.read_record(tmp_path / "first.jsonl")
  writers = len(list((workdir / "tensorboard").iterdir()))
  processes = _launch(workdir, tmp_path, _free_port())
  try:
    deadline = time.monotonic() + 400
    while not ((tmp_path / "record_0.jsonl").exists()
               and len(_train_run.read_record(tmp_path / "record_0.jsonl")[0]) >= 2):
      if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
        pytest.fail(f"2-process training did not reach step {start + 2}:\n" + "\n".join(log[-2000:]
                                                                                       for log in _logs(tmp_path)))
      time.sleep(0.2)
    processes[1].send_signal(signal.SIGINT)  # Ctrl-C on one host only
    returncodes = [p.wait(timeout=200) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = _logs(tmp_path)
  assert returncodes == [0, 130], "\n".join(log[-2000:] for log in logs)
  records = [_train_run.read_record(tmp_path / f"record_{index}.jsonl") for index in range(2)]
  losses = [record[0] for record in records]
  entries = records[0][2]
  stopped = max(losses[0])
  assert losses[0] == losses[1] and sorted(losses[0]) == list(range(start + 1, stopped + 1))  # the same global loss
  assert f"Resumed from {workdir / 'checkpoints'} at step {start}." in logs[0]
  assert "Ctrl-C: finishing this step, then saving it" in logs[1] and f"Preempted: saved step {stopped}" in logs[0]
  assert "Traceback" not in logs[0] + logs[1]
  assert f"step {start + 1}/" in logs[0] and f"step {start + 1}/" not in logs[1]  # progress: process 0 only
  assert len(list((workdir / "tensorboard").iterdir())) == writers + 1  # one TensorBoard writer
  data_states = sorted(p.name for p in (workdir / "checkpoints" / str(stopped) / "data").glob("*.json"))
  assert data_states == ["shard_0-of-2.json", "shard_1-of-2.json"]

  # One process, 8 devices, the same global batches (both shards side by side), the same steps, uninterrupted.
  one = tmp_path / "one_process"
  _train_run.run(one, one / "record.jsonl", [f"train.num_steps = {stopped}", "train.data_shards = 2",
                                            "train.eval_every = 2"])
  one_losses, one_batches, _ = _train_run.read_record(one / "record.jsonl")
  assert first_losses == {step: one_losses[step] for step in range(1, start + 1)}  # same topology: bitwise
  interleaved = [batch for pair in zip(records[0][1], records[1][1]) for batch in pair]  # per step: shard 0, 1
  assert one_batches == (first_batches + interleaved)[:len(one_batches)] and len(one_batches) == 2 * stopped
  # Evaluation during the 2-process run (every 2 steps) gives the 1-process run's validation losses.
  evaluations = [{e["validation_step"]: e["validation_loss"] for e in _train_run.read_record(path)[2]
                  if "validation_step" in e} for path in (tmp_path / "record_0.jsonl", one / "record.jsonl")]
  two_steps = sorted(evaluations[0])
  assert two_steps == list(range(start + 2, stopped + 1, 2)) and two_steps, evaluations
  np.testing.assert_allclose([evaluations[0][s] for s in two_steps], [evaluations[1][s] for s in two_steps],
                             rtol=1e-5)
  np.testing.assert_allclose([one_losses[s] for s in sorted(losses[0])], [losses[0][s] for s in sorted(losses[0])],
                             rtol=1e-6)
  # The 2-process checkpoint restores on 1 process to exactly the params the 2 processes held when saving...
  restored = _train_run.restore_state(workdir / "checkpoints", step=stopped)
  saved = {entry["saved"]: entry["params_sha1"] for entry in entries if "saved" in entry}
  assert _train_run.params_sha1(restored.params) == saved[stopped]
  # ...which are those of the 1-process run up to float rounding (gloo sums in another order). The largest
  # difference is in the key bias, whose gradient is 0 up to rounding (softmax ignores a shift), amplified by Adam.
  expected = _train_run.restore_state(one / "checkpoints", step=stopped)
  assert int(restored.step) == stopped
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), restored, expected)

  # Resumed on 1 process x 8 devices, the 2-process run goes on as the 1-process run does (which continues on its
  # own mesh, bitwise as if uninterrupted: test_resume): the same batches, the same losses, close params.
  more = stopped + 3
  _train_run.run(one, one / "record.jsonl", [f"train.num_steps = {more}"])
  _train_run.run(workdir, tmp_path / "resumed.jsonl", [f"train.num_steps = {more}"])
  one_losses, one_batches, _ = _train_run.read_record(one / "record.jsonl")
  resumed_losses, resumed_batches, _ = _train_run.read_record(tmp_path / "resumed.jsonl")
  assert sorted(resumed_losses) == list(range(stopped + 1, more + 1))
  assert resumed_batches == one_batches[2 * stopped:] and len(resumed_batches) == 6
  np.testing.assert_allclose([resumed_losses[s] for s in sorted(resumed_losses)],
                             [one_losses[s] for s in sorted(resumed_losses)], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               _train_run.restore_state(workdir / "checkpoints", step=more).params,
               _train_run.restore_state(one / "checkpoints", step=more).params)

"""A tiny training run through the real loop for the resume, preemption and multi-host tests.

In-process: `run(workdir, record, ...)`. As a script it is experiments/train.py (same flags) plus test hooks:
  CPM_TEST_RECORD=path           append {"step", "loss"}, {"batch"} and {"saved", "params_sha1"} lines (JSON) as
                                 training goes
  CPM_TEST_KILL_AFTER_SAVE=N     SIGKILL this process right after step N's save started (its completion is held
                                 back, so the kill always lands while the checkpoint is being written)
  CPM_TEST_SIGNAL_DURING_SAVE=SIG send this process the signal SIG (SIGTERM, SIGINT) while its preemption save is
                                 being written (for SIGINT, that save's completion is held back: the signal always
                                 lands while the checkpoint is being written)
"""

import asyncio
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import pathlib
import signal
import sys

import gin
import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from cpm_jax import checkpointing, gin_setup, model_fit, partitioning, train_loop, training
from cpm_jax.data import pipeline
from cpm_jax.models import cpm

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXTS = [("人民日报社论" * (2 + i % 7)) + f"第{i}篇。" for i in range(96)]

# A 2-layer CPM with dropout (so the RNG state matters) on a data x fsdp x tensor mesh of all 8 devices.
MODEL = dict(vocab_size=128, num_layers=2, embed_dim=32, num_heads=4, max_positions=64, dropout_rate=0.1)
MESH = dict(data=2, fsdp=2, tensor=2)
BINDINGS = [
    "train.model = @CPMLanguageModel()",
    "CPMLanguageModel.config = @CPMConfig()",
    *(f"CPMConfig.{name} = {value}" for name, value in MODEL.items()),
    "train.mesh_config = @MeshConfig()",
    *(f"MeshConfig.{name} = {value}" for name, value in MESH.items()),
    "train.data = @TextData()",
    "train.log_every = 1", "train.eval_every = 1000", "train.eval_max_batches = 1", "train.peak_flops = 1e12",
    "learning_rate_schedule.peak = 1e-2", "learning_rate_schedule.warmup_steps = 2",
    "learning_rate_schedule.total_steps = 10",
    "Checkpointer.save_interval_steps = 3", "Checkpointer.max_to_keep = 10",
]


class CharTokenizer:
  eod_id = 7

  def encode(self, text):
    return [8 + (ord(c) % 120) for c in text]


class _RecordingIterator:
  """Delegates to a checkpointable iterator and records a fingerprint of every batch it returns."""

  def __init__(self, iterator, record):
    self._iterator, self._record = iterator, record

  def __next__(self):
    batch = next(self._iterator)
    if self._record:
      digest = hashlib.sha1(batch["inputs"].tobytes() + batch["targets"].tobytes()).hexdigest()[:16]
      _append(self._record, {"batch": digest})
    return batch

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    self._iterator.set_state(state)


@gin.configurable
class TextData:
  """TEXTS through the real Grain pipeline; `shard(index, count)`: as process `index` of `count` reads them."""

  seq_len = 32
  global_batch_size = 8

  def __init__(self, process_index: int | None = None, process_count: int | None = None):
    self._share = {"process_index": process_index, "process_count": process_count}
    self._examples = [{"text": text} for text in TEXTS]

  def shard(self, index, count):
    return TextData(index, count)

  def train_iterator(self, seed):
    iterator = pipeline.make_lm_iterator(self._examples, CharTokenizer(), seq_len=self.seq_len,
                                         global_batch_size=self.global_batch_size, seed=seed, **self._share)
    return _RecordingIterator(iterator, os.environ.get("CPM_TEST_RECORD"))

  def eval_batches(self):
    return pipeline.make_eval_iterator(self._examples[:8], CharTokenizer(), seq_len=self.seq_len,
                                       global_batch_size=self.global_batch_size)

  def checkpoint_metadata(self):
    return {}

  def model_requirements(self):
    return (model_fit.Requirement("vocab_size", 128, "CharTokenizer", ("inputs", "targets")),
            model_fit.Requirement("max_positions", self.seq_len, "TextData.seq_len", ("positions",)))


def session_root(tmp_path_factory) -> pathlib.Path:
  """A temporary folder shared by all pytest-xdist workers of this test session."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@contextlib.contextmanager
def session_lock(tmp_path_factory, name: str):
  """Holds a file lock shared by all workers, so that one of them builds what the others then reuse."""
  with open(session_root(tmp_path_factory) / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A persistent XLA cache shared by all runs of this test session (every pytest-xdist worker and their
  subprocesses): each program compiles once. A half-written entry read by another process is only a warning."""
  options = {"jax_compilation_cache_dir": str(session_root(tmp_path_factory) / "jax_compilation_cache"),
             "jax_persistent_cache_min_compile_time_secs": 0.5}
  saved = {name: getattr(jax.config, name) for name in options}
  with pytest.MonkeyPatch.context() as patch:
    for name, value in options.items():
      jax.config.update(name, value)
      patch.setenv(name.upper(), str(value))  # for subprocesses
    jax_compilation_cache.reset_cache()
    yield
    for name, value in saved.items():
      jax.config.update(name, value)
    jax_compilation_cache.reset_cache()


def _append(path, entry):
  with open(path, "a") as f:
    f.write(json.dumps(entry) + "\n")


def read_record(path):
  """(losses by step, batch fingerprints in order, other entries) from a record file."""
  entries = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
  losses = {entry["step"]: entry["loss"] for entry in entries if "loss" in entry}
  return losses, [entry["batch"] for entry in entries if "batch" in entry], entries


def params_sha1(params):
  """A digest of the whole (global) params, the same on every process and for any sharding."""
  digest = hashlib.sha1()
  for leaf in jax.tree.leaves(params):
    digest.update(np.asarray(multihost_utils.process_allgather(leaf, tiled=True)).tobytes())
  return digest.hexdigest()


def _record_losses():
  """Records each step's loss and each evaluation's loss ({"validation_step", "validation_loss"})."""
  original, original_scalars = train_loop.MetricsLog.train, train_loop.MetricsLog.scalars

  def train(self, step, metrics, tokens_seen):
    if os.environ.get("CPM_TEST_RECORD"):
      _append(os.environ["CPM_TEST_RECORD"], {"step": step, "loss": metrics["loss"]})
    return original(self, step, metrics, tokens_seen)

  def scalars(self, step, values, prefix):
    if os.environ.get("CPM_TEST_RECORD") and prefix == "validation":
      _append(os.environ["CPM_TEST_RECORD"], {"validation_step": step, "validation_loss": values["loss"]})
    return original_scalars(self, step, values, prefix)

  train_loop.MetricsLog.train, train_loop.MetricsLog.scalars = train, scalars


def run(workdir, record, bindings=(), **kwargs):
  """Trains in this process with BINDINGS + bindings; losses and batches are appended to `record`."""
  gin.clear_config()
  gin_setup.parse([], BINDINGS + list(bindings))
  originals = train_loop.MetricsLog.train, train_loop.MetricsLog.scalars
  os.environ["CPM_TEST_RECORD"] = str(record)
  try:
    _record_losses()
    return train_loop.train(str(workdir), **kwargs)
  finally:
    train_loop.MetricsLog.train, train_loop.MetricsLog.scalars = originals
    del os.environ["CPM_TEST_RECORD"]
    gin.clear_config()


def restore_state(checkpoint_dir, step=None, mesh_config=None):
  """The TrainState saved in checkpoint_dir (default: latest step), as numpy arrays."""
  model = cpm.CPMLanguageModel(cpm.CPMConfig(**MODEL))
  mesh = partitioning.make_mesh(mesh_config or partitioning.MeshConfig(**MESH))
  optimizer = training.make_optimizer(training.learning_rate_schedule())
  abstract, shardings = training.state_shardings(model, optimizer, mesh)
  with checkpointing.Checkpointer(checkpoint_dir) as checkpointer:
    return jax.tree.map(np.asarray, checkpointer.restore(abstract, shardings, step=step))


def _install_test_hooks():
  _record_losses()
  original_save = checkpointing.Checkpointer.maybe_save
  kill_step = int(os.environ.get("CPM_TEST_KILL_AFTER_SAVE", -1))
  preempted = []

  second_signal = os.environ.get("CPM_TEST_SIGNAL_DURING_SAVE")

  def maybe_save(self, step, state, data_iterator=None, force=False):
    if preempted and second_signal == "SIGINT":
      self.wait()
      _hold_back_checkpoint_completion()
    if step == kill_step:
      self.wait()  # the previous checkpoint completes; this one never will
      _hold_back_checkpoint_completion()
    started = original_save(self, step, state, data_iterator, force)
    if started:
      _append(os.environ["CPM_TEST_RECORD"], {"saved": step, "params_sha1": params_sha1(state.params)})
    if started and step == kill_step:
      os.kill(os.getpid(), signal.SIGKILL)
    if started and preempted and second_signal:
      _append(os.environ["CPM_TEST_RECORD"], {f"{second_signal}_during_save_of_step": step})
      os.kill(os.getpid(), signal.Signals[second_signal])
    return started

  original_should_stop = checkpointing.PreemptionGuard.should_stop

  def should_stop(self, step):
    stop = original_should_stop(self, step)
    if stop:
      preempted.append(step)
    return stop

  checkpointing.Checkpointer.maybe_save = maybe_save
  checkpointing.PreemptionGuard.should_stop = should_stop


def _hold_back_checkpoint_completion():
  """Orbax renames a finished checkpoint's temporary directory in finalize(); make that never happen."""
  from orbax.checkpoint._src.path import atomicity

  async def never(*args, **kwargs):
    await asyncio.sleep(3600)

  atomicity.AtomicRenameTemporaryPath.finalize = never


if __name__ == "__main__":
  from cpm_jax import programs

  spec = importlib.util.spec_from_file_location("train_program", ROOT / "experiments" / "train.py")
  program = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(program)
  _install_test_hooks()
  sys.argv[1:1] = [f"--gin_bindings={binding}" for binding in BINDINGS]  # the command line's bindings win
  programs.run(program.main, user_errors=(train_loop.TrainingDiverged,))

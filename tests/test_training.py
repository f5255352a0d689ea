"""Train step semantics (accumulation, non-finite skipping, schedule) and the gin-configured loop."""

import copy
import dataclasses
import json
import os
import time

import gin
import jax
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing import event_accumulator

from cpm_jax import checkpointing, gin_setup, model_fit, partitioning, train_loop, training
from cpm_jax.data import pipeline
from cpm_jax.models import cpm

TINY = cpm.CPMConfig(vocab_size=128, num_layers=2, embed_dim=32, num_heads=4, max_positions=64, dropout_rate=0.0)


def _batch(batch=8, length=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(8, TINY.vocab_size, (batch, length + 1)).astype(np.int32)
  weights = (rng.random((batch, length)) > 0.2).astype(np.float32)  # uneven token counts per microbatch
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights,
          "segment_ids": np.ones((batch, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()}


def _setup(num_microbatches=1, mesh_sizes=None):
  mesh = partitioning.make_mesh(partitioning.MeshConfig(**(mesh_sizes or dict(data=8))))
  model = cpm.CPMLanguageModel(TINY)
  optimizer = training.make_optimizer(training.learning_rate_schedule(1e-2, 2, 10))
  steps = training.make_sharded_steps(model, optimizer, mesh, num_microbatches=num_microbatches)
  return mesh, model, optimizer, steps


def test_gradient_accumulation_equals_one_big_batch():
  results = []
  for microbatches in (1, 4):
    mesh, model, optimizer, steps = _setup(microbatches, dict(data=2, fsdp=1, tensor=4))
    state = training.create_train_state(model, optimizer, mesh, seed=0)
    state, metrics = steps.train(state, training.global_batch(_batch(), mesh))
    results.append((float(metrics["loss"]), float(metrics["grad_norm"]), jax.tree.map(np.asarray, state.params)))
  (loss1, norm1, params1), (loss4, norm4, params4) = results
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
  np.testing.assert_allclose(norm4, norm1, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params4)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_non_finite_step_is_skipped_and_counted():
  mesh, model, optimizer, steps = _setup()
  state = training.create_train_state(model, optimizer, mesh, seed=0)
  state, _ = steps.train(state, training.global_batch(_batch(), mesh))
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  poisoned = _batch(seed=1)
  poisoned["weights"][0, 0] = np.nan
  for expected_bad in (1, 2):
    state, metrics = steps.train(state, training.global_batch(poisoned, mesh))
    assert not bool(metrics["finite"])
    assert int(state.consecutive_bad_steps) == expected_bad
  after = jax.tree.map(np.asarray, (state.params, state.opt_state))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  state, metrics = steps.train(state, training.global_batch(_batch(seed=2), mesh))
  assert bool(metrics["finite"]) and int(state.consecutive_bad_steps) == 0 and int(state.skipped_steps) == 2
  assert int(state.step) == 4


def test_global_batch_shards_leaves_of_any_rank_over_the_batch_axes():
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
  local = {"labels": np.arange(8, dtype=np.int32), "tokens": _batch()["inputs"],
           "features": np.arange(8 * 3 * 5, dtype=np.float32).reshape(8, 3, 5)}
  batch = training.global_batch(local, mesh)
  for name, leaf in batch.items():
    assert leaf.sharding.spec[0] == ("data", "fsdp") and all(axis is None for axis in leaf.sharding.spec[1:]), name
    assert leaf.addressable_shards[0].data.shape == (2, *leaf.shape[1:]), name  # 8 rows over data x fsdp = 4
    np.testing.assert_array_equal(leaf, local[name])


def test_schedule_warmup_then_cosine_to_end_ratio():
  schedule = training.learning_rate_schedule(peak=1.0, warmup_steps=10, total_steps=110, decay="cosine", end_ratio=0.1)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), 0.5)
  np.testing.assert_allclose(float(schedule(10)), 1.0)
  np.testing.assert_allclose(float(schedule(60)), 0.55, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(110)), 0.1, rtol=1e-5)
  linear = training.learning_rate_schedule(peak=1.0, warmup_steps=0, total_steps=100, decay="linear", end_ratio=0.0)
  np.testing.assert_allclose(float(linear(50)), 0.5)
  with pytest.raises(ValueError, match="decay='exp'"):
    training.learning_rate_schedule(decay="exp")


def test_clip_by_global_norm_matches_optax():
  rng = np.random.default_rng(0)
  grads = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
  norm = float(optax.tree.norm(grads))
  for max_norm in (norm / 3, norm * 2):  # clipped, then left alone
    expected, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    ours = training.clip_by_global_norm(max_norm)
    for given in (None, norm):  # the norm computed by the transformation, or passed in by the step
      clipped, _ = ours.update(grads, ours.init(grads), global_norm=given)
      for key in grads:
        np.testing.assert_allclose(clipped[key], expected[key], rtol=1e-6)


def test_weight_decay_skips_biases_and_layer_norms():
  params = cpm.init(TINY, jax.random.key(0))
  zero_grads = jax.tree.map(np.zeros_like, params)
  optimizer = training.make_optimizer(optax.constant_schedule(1.0), weight_decay=0.5, clip_norm=None)
  updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
  assert np.abs(updates["blocks"]["attn"]["qkv_kernel"]).max() > 0
  assert np.abs(updates["embed"]["wte"]).max() > 0
  assert np.abs(updates["blocks"]["ln_1"]["scale"]).max() == 0
  assert np.abs(updates["blocks"]["mlp"]["in_bias"]).max() == 0


class _CharTokenizer:
  eod_id = 7

  def encode(self, text):
    return [8 + (ord(c) % 120) for c in text]


class _ListData:
  """A tiny in-memory corpus through the real Grain pipeline."""

  seq_len = 32
  global_batch_size = 8

  def model_requirements(self):
    return (model_fit.Requirement("vocab_size", 128, "_CharTokenizer", ("inputs", "targets"), adopt=True),
            model_fit.Requirement("max_positions", self.seq_len, "_ListData.seq_len", ("positions",)))

  def __init__(self, texts):
    self._texts = [{"text": t} for t in texts]
    self._share = {}

  def shard(self, index, count):
    shard = copy.copy(self)
    shard._share = {"process_index": index, "process_count": count}
    return shard

  def train_iterator(self, seed):
    return pipeline.make_lm_iterator(self._texts, _CharTokenizer(), seq_len=self.seq_len,
                                     global_batch_size=self.global_batch_size, seed=seed, **self._share)

  def eval_batches(self):
    return pipeline.make_eval_iterator(self._texts[:8], _CharTokenizer(), seq_len=self.seq_len,
                                       global_batch_size=self.global_batch_size)

  def checkpoint_metadata(self):
    return {}


def test_loop_learns_logs_and_writes_workdir(tmp_path, monkeypatch):
  texts = [("人民日报" * (3 + i % 5)) + "。" for i in range(64)]
  gin.clear_config()
  gin_setup.parse([], ["learning_rate_schedule.peak = 1e-2", "learning_rate_schedule.warmup_steps = 2",
                       "learning_rate_schedule.total_steps = 24"])
  events = []  # the order in which steps are dispatched and their metrics read on the host
  make_steps, read = training.make_sharded_steps, train_loop._LaggedMetrics._read

  def recording_steps(*args, **kwargs):
    steps = make_steps(*args, **kwargs)

    def train(state, batch):
      events.append(("dispatch", len([e for e in events if e[0] == "dispatch"]) + 1))
      return steps.train(state, batch)
    return dataclasses.replace(steps, train=train)

  def recording_read(self, step, metrics):
    events.append(("read", step))
    return read(self, step, metrics)
  monkeypatch.setattr(training, "make_sharded_steps", recording_steps)
  monkeypatch.setattr(train_loop._LaggedMetrics, "_read", recording_read)
  metrics = train_loop.train(str(tmp_path), model=cpm.CPMLanguageModel(TINY), data=_ListData(texts),
                             num_steps=24, log_every=4, eval_every=12, peak_flops=1e12)
  # Each step's metrics are read once the next step is queued (the host never waits on the step it just fed),
  # except before an evaluation (steps 12, 24), which needs the step done anyway.
  for step in range(1, 25):
    position = events.index(("read", step))
    assert ("dispatch", step + 1) in events[:position] or step in (12, 24), events[position - 3:position + 1]
  assert [e for e in events if e[0] == "read"] == [("read", step) for step in range(1, 25)]
  assert metrics["validation_loss"] < 3.0  # from ~log(128) = 4.85 at init: the repetitive text is learned
  assert os.path.exists(tmp_path / "config.gin")
  assert json.loads((tmp_path / "final_metrics.json").read_text())["loss"] == pytest.approx(metrics["loss"])
  assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == "24"
  # TensorBoard reads the scalars back: every log_every steps and at each evaluation.
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
  for name in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"):
    assert [step for step, _ in scalars[f"train/{name}"]] == [4, 8, 12, 16, 20, 24], name
    assert all(np.isfinite(value) and value >= 0 for _, value in scalars[f"train/{name}"]), name
  assert scalars["train/loss"][-1][1] == pytest.approx(metrics["loss"])
  assert scalars["train/learning_rate"][-1][1] == pytest.approx(float(training.learning_rate_schedule()(23)))
  perplexity = scalars["validation/perplexity"]
  assert [step for step, _ in perplexity] == [12, 24] and perplexity[1][1] < perplexity[0][1]
  assert perplexity[1][1] == pytest.approx(metrics["validation_perplexity"])
  # Run again on the finished workdir: nothing to train, and its final metrics stand (they were overwritten by {}).
  again = train_loop.train(str(tmp_path), model=cpm.CPMLanguageModel(TINY), data=_ListData(texts), num_steps=24,
                           log_every=4, eval_every=12, peak_flops=1e12)
  assert again == json.loads((tmp_path / "final_metrics.json").read_text()) and again["loss"] == metrics["loss"]
  gin.clear_config()


def test_divergence_stops_the_loop_and_saves_the_last_finite_params(tmp_path, monkeypatch):
  data = _ListData(["坏数据。"] * 16)
  original = data.train_iterator

  class _PoisonedAfterTwoSteps:  # batches 3, 4, ... have NaN weights: a non-finite loss from step 3 on
    def __init__(self, seed):
      self._iterator, self._served = original(seed), 0

    def __next__(self):
      batch, self._served = next(self._iterator), self._served + 1
      return batch if self._served <= 2 else dict(batch, weights=np.full_like(batch["weights"], np.nan))

    def get_state(self):
      return self._iterator.get_state()

    def set_state(self, state):
      self._iterator.set_state(state)
  monkeypatch.setattr(data, "train_iterator", _PoisonedAfterTwoSteps)
  gin.clear_config()
  gin_setup.parse([], ["Checkpointer.save_interval_steps = 2"])
  try:
    with pytest.raises(train_loop.TrainingDiverged, match=r"Stopped at step \d+: 3 consecutive steps had a non-finite "
                       rf"loss .* the params of the last finite step \(2\) are saved in {tmp_path}/diverged/step_2 "
                       r"\(a params-only checkpoint"):
      train_loop.train(str(tmp_path), model=cpm.CPMLanguageModel(TINY), data=data, num_steps=10,
                       max_consecutive_bad_steps=3, peak_flops=1e12)
  finally:
    gin.clear_config()
  diverged, metadata = checkpointing.restore_params(tmp_path / "diverged" / "step_2")
  assert metadata["diverged"]["last_finite_step"] == 2 and metadata["model"] == "cpm"
  # The bad steps left the params untouched: they are those the periodic checkpoint of step 2 holds, bit for bit.
  with checkpointing.Checkpointer(tmp_path / "checkpoints", read_only=True) as checkpointer:
    after_two_steps = checkpointer.stored_params(2).read(jax.eval_shape(lambda: diverged))
  jax.tree.map(np.testing.assert_array_equal, diverged, after_two_steps)
  assert np.isfinite(np.asarray(diverged["embed"]["wte"])).all()


def test_gin_errors_name_the_culprit(tmp_path, monkeypatch):
  gin.clear_config()
  with pytest.raises(gin_setup.ConfigError, match="--gin_file 'no_such_file.gin' does not exist"):
    gin_setup.parse(["no_such_file.gin"], [])
  with pytest.raises(ValueError, match="CPMConfig.no_such_field"):
    gin_setup.parse(["models/cpm_small.gin"], ["CPMConfig.no_such_field = 3"])
  gin.clear_config()
  monkeypatch.chdir(tmp_path)  # files and their includes are found from anywhere, as the README's commands do
  gin_setup.parse(["models/cpm_large.gin", "experiments/cpm_demo.gin"], [])
  assert (cpm.CPMConfig().embed_dim, cpm.CPMConfig().num_layers) == (128, 2)  # cpm_demo includes cpm_mini.gin
  gin.clear_config()
  with pytest.raises(gin_setup.ConfigError, match=r"^MeshConfig.dcn\['tensor'\]=3 must be positive"):
    partitioning.make_mesh(partitioning.MeshConfig(data=-1, tensor=2, dcn={"tensor": 3}))


class _SlowData(_ListData):
  """_ListData whose batches take `delay` seconds each to arrive."""

  delay = 0.2

  def train_iterator(self, seed):
    batches = super().train_iterator(seed)

    class Slow:
      def __next__(self):
        time.sleep(_SlowData.delay)
        return next(batches)

      def __getattr__(self, name):  # get_state / set_state for checkpoints
        return getattr(batches, name)
    return Slow()


def test_loop_logs_the_pipeline_bubble_and_the_data_wait(tmp_path, caplog):
  """On a stage mesh the log states the schedule and its bubble; each progress line the fraction of the time spent
  waiting for data (here batches that take 0.2 s to arrive)."""
  gin.clear_config()
  caplog.set_level("INFO")
  texts = [("人民日报" * (3 + i % 5)) + "。" for i in range(64)]
  stages = partitioning.MeshConfig(data=2, tensor=2, extra_axes={"stage": 2})
  train_loop.train(str(tmp_path), model=cpm.CPMLanguageModel(dataclasses.replace(TINY, pipeline_microbatches=2)),
                   data=_SlowData(texts), mesh_config=stages, num_steps=4, log_every=2, eval_every=1000,
                   eval_max_batches=1, peak_flops=1e12)
  assert "Pipeline: 2 stages (GPipe), 2 microbatches: 3 iterations, bubble 33.3%" in caplog.text
  waits = [int(line.split("data wait ")[1].split("%")[0]) for line in caplog.text.splitlines() if "data wait" in line]
  assert len(waits) == 2 and waits[1] > 0, waits  # the second window has no compilation in it


def test_wrong_bindings_name_the_binding_and_write_nothing(tmp_path):
  gin.clear_config()
  with pytest.raises(gin_setup.ConfigError, match=r"^train.num_steps = '2': expected int, not a str\.$"):
    gin_setup.parse(["experiments/cpm_demo.gin"], ["train.num_steps = '2'"])
  gin.clear_config()
  with pytest.raises(gin_setup.ConfigError, match=r"^learning_rate_schedule.peak = 'high': expected float"):
    gin_setup.parse([], ["learning_rate_schedule.peak = 'high'"])
  gin.clear_config()
  with pytest.raises(gin_setup.ConfigError, match=r"^train.mesh_config = @CPMConfig\(\): expected MeshConfig"):
    gin_setup.parse([], ["train.mesh_config = @CPMConfig()"])
  gin.clear_config()
  gin_setup.parse([], ["train.num_steps = 2", "learning_rate_schedule.peak = 1", "CPMConfig.dropout_rate = 0"])
  gin.clear_config()  # ints where floats are expected are fine
  broken = tmp_path / "broken.gin"
  broken.write_text("train.num_steps = 2\ntrain.log_every = (\n")
  with pytest.raises(gin_setup.ConfigError, match=rf"^{broken}:\d: "):
    gin_setup.parse([str(broken)], [])
  gin.clear_config()
  with pytest.raises(gin_setup.ConfigError, match=r"^--gin_bindings 'train.nope = 1': "):
    gin_setup.parse([], ["train.num_steps = 2", "train.nope = 1"])
  gin.clear_config()
  # A mesh the devices cannot form fails before the workdir is created.
  workdir = tmp_path / "workdir"
  with pytest.raises(gin_setup.ConfigError, match="MeshConfig"):
    train_loop.train(str(workdir), model=cpm.CPMLanguageModel(TINY), data=_ListData(["文本。"] * 16), num_steps=2,
                     mesh_config=partitioning.MeshConfig(data=3, fsdp=1, tensor=1), peak_flops=1e12)
  assert not workdir.exists()

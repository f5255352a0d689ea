"""The training loop: data -> sharded train_step -> metrics, evaluation and checkpoints.

`train(workdir)` is configured by gin (model, data, mesh, optimizer, steps); experiments/train.py is a
thin absl wrapper around it. It resumes from the latest complete checkpoint in `workdir/checkpoints`
and, on SIGTERM or Ctrl-C, finishes the current step, saves, and returns (a second Ctrl-C aborts that save:
TrainingAborted); a stop that a program running several trainings received before this one began (its
checkpointing.PreemptionGuard around them) returns before the first step. Everything that can be checked before the
run starts (the model against the data, the mesh, the checkpoints and params it starts from) is checked before
anything is written to `workdir`. A run that diverges saves the params of its last finite step in
`workdir/diverged/step_<N>` before it stops (TrainingDiverged).

The host never waits for the step it has just dispatched: each step's metrics are read once the next step is queued
(MaxText's buffered metrics), so the devices always have work; bad-step counts and the divergence check come from
those host copies.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Iterable, Iterator

import gin
import jax
import jax.numpy as jnp
from absl import logging

from cpm_jax import checkpointing, flops, layers, model_fit, partitioning, pipeline_parallel, training
from cpm_jax.data import processes
from cpm_jax.gin_setup import ConfigError
from cpm_jax.models import registry

DIVERGED_DIR = "diverged"  # workdir/diverged/step_<N>: the params of a diverged run's last finite step


class TrainingDiverged(RuntimeError):
  """Raised after too many consecutive steps with a non-finite loss or gradient (experiments/train.py prints it as
  one line: cpm_jax.programs)."""


class TrainingAborted(KeyboardInterrupt):
  """A second Ctrl-C while the first one's save was pending: the run stops without completing it."""


class MetricsLog:
  """Console progress and TensorBoard scalars, written once (process 0)."""

  def __init__(self, workdir: str, start_step: int, total_steps: int, flops_per_step: float, peak_flops: float):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._total_steps = total_steps
    self._flops_per_step = flops_per_step
    self._peak_flops = peak_flops
    self._last = (start_step, time.perf_counter())  # throughput is measured from here
    self._data_wait = 0.0  # seconds spent waiting for batches since then

  def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
    if self._writer is not None:
      for name, value in values.items():
        self._writer.add_scalar(f"{prefix}/{name}", value, step)
      self._writer.flush()

  def restart(self, step: int) -> None:
    """Measures throughput from now on (after evaluation or checkpoint waits)."""
    self._last = (step, time.perf_counter())
    self._data_wait = 0.0

  def waited_for_data(self, seconds: float) -> None:
    """Counts time the host spent blocked on the data iterator (logged as a fraction of the step time)."""
    self._data_wait += seconds

  def train(self, step: int, metrics: dict[str, float], tokens_per_step: float) -> None:
    """Logs a step's metrics with throughput since the previous call (the first includes compilation)."""
    now = time.perf_counter()
    last_step, last_time = self._last
    self._last = (step, now)
    seconds = max(now - last_time, 1e-9)
    steps_per_second = (step - last_step) / seconds
    metrics = dict(metrics, tokens_per_second=steps_per_second * tokens_per_step,
                   mfu=steps_per_second * self._flops_per_step / self._peak_flops,
                   steps_per_second=steps_per_second, data_wait_fraction=min(self._data_wait / seconds, 1.0))
    self._data_wait = 0.0
    eta = (self._total_steps - step) / max(steps_per_second, 1e-9)
    logging.info("step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s  MFU %.1f%%  data wait %.0f%%  ETA %s%s", step,
                 self._total_steps, metrics["loss"], metrics["learning_rate"], metrics["tokens_per_second"],
                 100 * metrics["mfu"], 100 * metrics["data_wait_fraction"], time.strftime("%H:%M:%S", time.gmtime(eta)),
                 f"  skipped {int(metrics['skipped_steps'])}" if metrics["skipped_steps"] else "")
    self.scalars(step, metrics, "train")

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def evaluate(steps: training.ShardedSteps, params: Any, batches: Iterable[dict], mesh, max_batches: int | None,
             check: model_fit.BatchCheck | None = None) -> dict:
  """Token-weighted loss, perplexity and accuracy over (at most max_batches of) the evaluation batches, each
  checked on the host by `check` first."""
  totals: dict[str, float] = {}
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    if check is not None:
      check(batch, f"evaluation batch {i}")
    sums = steps.evaluate(params, training.global_batch(batch, mesh))
    for name, value in sums.items():
      totals[name] = totals.get(name, 0.0) + float(value)
  weight = max(totals.get("weight_sum", 0.0), 1.0)
  loss = totals.get("loss_sum", math.nan) / weight
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": totals.get("correct_sum", 0.0) / weight,
          "tokens": totals.get("weight_sum", 0.0)}


def _write_atomically(path: str, text: str) -> None:
  if jax.process_index() == 0:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(path + ".tmp", path)


def _model_record(model: training.Model, data: Any, **extra) -> dict:
  """registry.record of the model's config plus the data's checkpoint_metadata() (e.g. the tokenizer path)."""
  return registry.record(model.config, **data.checkpoint_metadata(), **extra)


def _write_config(workdir: str, model: training.Model, data: Any) -> None:
  """config.gin (the operative gin config) and checkpointing.MODEL_RECORD (`_model_record`)."""
  _write_atomically(os.path.join(workdir, "config.gin"), gin.config_str())
  _write_atomically(os.path.join(workdir, checkpointing.MODEL_RECORD),
                    json.dumps(_model_record(model, data), indent=1, ensure_ascii=False))


def _save_diverged(workdir: str, state: training.TrainState, model: training.Model, data: Any,
                   stopped_at: int) -> str:
  """Saves the params of `state` (those of its last finite step: bad steps leave them untouched) as a params-only
  checkpoint in workdir/diverged/step_<N>; returns a sentence saying where."""
  last_finite = int(state.step) - int(state.consecutive_bad_steps)
  path = os.path.join(workdir, DIVERGED_DIR, f"step_{last_finite}")
  if os.path.exists(path):
    return f"the params of the last finite step ({last_finite}) were saved before in {path}"
  checkpointing.save_params(path, state.params, _model_record(
      model, data, diverged={"last_finite_step": last_finite, "stopped_at_step": stopped_at}))
  return (f"the params of the last finite step ({last_finite}) are saved in {path} (a params-only checkpoint for "
          "evaluate.py, generate.py or --init_params_from; not a resume point, the workdir resumes from checkpoints/)")


class _LaggedMetrics:
  """Each step's metrics read to the host one step late, once the next step is queued, so reading them never
  leaves the devices idle; counts non-finite steps from them as train_step does on device."""

  def __init__(self, consecutive_bad_steps: int, skipped_steps: int):
    self.consecutive_bad_steps, self.skipped_steps = consecutive_bad_steps, skipped_steps
    self._pending: tuple[int, dict] | None = None

  def push(self, step: int, metrics: dict) -> tuple[int, dict[str, float]] | None:
    """Holds step `step`'s metrics (device arrays); returns the previous step's, read."""
    previous, self._pending = self._pending, (step, metrics)
    return None if previous is None else self._read(*previous)

  def flush(self) -> tuple[int, dict[str, float]] | None:
    """The held step's metrics, read (None if none is held)."""
    previous, self._pending = self._pending, None
    return None if previous is None else self._read(*previous)

  def _read(self, step: int, metrics: dict) -> tuple[int, dict[str, float]]:
    values = {name: float(value) for name, value in jax.device_get(metrics).items()}
    finite = bool(values["finite"])
    self.consecutive_bad_steps = 0 if finite else self.consecutive_bad_steps + 1
    self.skipped_steps += not finite
    return step, values


def _fresh_params(model: training.Model, steps: training.ShardedSteps, seed: int) -> Any:
  """The params a run from scratch with `seed` starts from (training.create_train_state's), placed sharded."""
  init_key, _ = jax.random.split(jax.random.PRNGKey(seed))
  init = jax.jit(lambda key: layers.init_from_specs(model.param_specs(), key),
                 out_shardings=steps.state_shardings.params)
  return init(init_key)


def _warm_start(init_from: checkpointing.RestoreCheckpointConfig, model: training.Model,
                steps: training.ShardedSteps, seed: int) -> Any:
  """Fresh params with the part `init_from` selects read from its checkpoint."""
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(steps.abstract_state.params)}
  if init_from.dtype is not None and dtypes != {jnp.dtype(init_from.dtype)}:
    raise ConfigError(f"RestoreCheckpointConfig.dtype = {init_from.dtype!r}, but the model's params are "
                      f"{sorted(map(str, dtypes))} and the train state keeps them so: set the model config's "
                      "param_dtype instead.")
  start = checkpointing.warm_start(init_from, _fresh_params(model, steps, seed))
  logging.info("Warm start from %s: %d params restored, %d initialised (%s).", init_from.path, len(start.restored),
               len(start.initialised), ", ".join(start.initialised[:8]) + (" ..." if len(start.initialised) > 8
                                                                          else ""))
  return start.params


def _resumed_data_shards(bound: int | None, checkpointer: checkpointing.Checkpointer, step: int | None) -> int | None:
  """The data shard count a resumed run keeps: its checkpoint's (None: it holds no data state)."""
  saved = checkpointer.data_shard_count(checkpointer.latest_step() if step is None else step)
  if saved is not None and bound is not None and bound != saved:
    raise ConfigError(f"train.data_shards = {bound}, but {checkpointer.directory} was saved with {saved} data shards; "
                      "a run keeps the shard count it started with (unbind train.data_shards).")
  return saved if saved is not None else bound


@contextlib.contextmanager
def _closing_unless_aborted(checkpointer: checkpointing.Checkpointer, current_step) -> Iterator[None]:
  """Closes `checkpointer` (a pending save completes) however the loop ends, except on a second Ctrl-C: then
  TrainingAborted says which checkpoint is left incomplete and which one is the latest complete."""
  try:
    yield
  except KeyboardInterrupt as e:
    steps = checkpointer.complete_steps_on_disk()
    latest = f"step {steps[-1]}" if steps else "none"
    raise TrainingAborted(f"interrupted again at step {current_step()}: the run stopped without saving it (a save "
                          "left half-written is never restored); the latest complete checkpoint in "
                          f"{checkpointer.directory} is {latest}.") from e
  except BaseException:
    checkpointer.close()
    raise
  checkpointer.close()


def _stop_metric(preemption: checkpointing.PreemptionGuard) -> str:
  """The final metric that says where a stopped run stopped: Ctrl-C or SIGTERM."""
  return "interrupted_at_step" if preemption.signal_name == "SIGINT" else "preempted_at_step"


@gin.configurable(denylist=["workdir"])
def train(workdir: str, *, model: training.Model = gin.REQUIRED, data: Any = gin.REQUIRED,
          mesh_config: partitioning.MeshConfig | None = None, num_steps: int = 1000, num_microbatches: int = 1,
          seed: int = 0, log_every: int = 10, eval_every: int = 200, eval_max_batches: int | None = 20,
          max_consecutive_bad_steps: int = 10, peak_flops: float | None = None, restore_step: int | None = None,
          init_params_from: str | None = None, init_from: checkpointing.RestoreCheckpointConfig | None = None,
          data_shards: int | None = None) -> dict:
  """Trains `model` on `data` for num_steps, resuming from workdir/checkpoints; returns the last metrics.

  data: a cpm_jax.data.processes.ProcessShare with global_batch_size, seq_len (the tokens of an example: what
  tokens/s and MFU count), train_iterator(seed) (checkpointable Grain iterator of per-process batches),
  eval_batches() and model_requirements() (cpm_jax.model_fit: the model is fitted to it first, e.g. vocab_size
  from the tokenizer unless gin binds it). peak_flops: total peak FLOP/s for MFU (default: published per-device
  figures, or the measured matmul peak on CPU, where all fake devices share the same cores).
  restore_step: resume from this checkpoint step instead of the latest (an error if it is absent).
  With no checkpoint in workdir yet, a new run starts from
    init_params_from: every param of this params-only checkpoint (e.g. a converted model), checked path for path;
    init_from: the params a RestoreCheckpointConfig selects (a warm start: stage 2 from stage 1), the rest fresh;
  each with a fresh optimizer.
  data_shards: how many shards the training data is read in (default: the process count a run starts with; a resumed
  run keeps its checkpoint's), so that it resumes on any process count dividing it (processes.ShardedIterator reads
  `data.shard(index, count)`, the data as process `index` of `count` would read it).
  """
  if init_params_from and init_from is not None:
    raise ConfigError("train: give init_params_from or init_from (a RestoreCheckpointConfig), not both.")
  model = model_fit.fit(model, data)
  check_batch = model_fit.BatchCheck(model.config, data.model_requirements())
  mesh = partitioning.make_mesh(mesh_config)
  shards_of_a_batch = partitioning.batch_shards(mesh)
  if data.global_batch_size % (shards_of_a_batch * num_microbatches):
    raise ConfigError(f"{type(data).__name__}.global_batch_size={data.global_batch_size} does not split into "
                      f"num_microbatches={num_microbatches} x {shards_of_a_batch} batch shards of the mesh "
                      f"{dict(mesh.shape)}: bind a multiple of {shards_of_a_batch * num_microbatches}.")
  optimizer = training.make_optimizer()
  steps = training.make_sharded_steps(model, optimizer, mesh, num_microbatches=num_microbatches,
                                      make_step=registry.of_config(model.config).train_step)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  checkpointer = checkpointing.Checkpointer(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None
  resuming = restore_step is not None or (checkpointer is not None and checkpointer.latest_step() is not None)
  if resuming and checkpointer is None:
    raise FileNotFoundError(f"restore_step={restore_step} (--restore_step): {checkpoint_dir} does not exist.")
  shards = _resumed_data_shards(data_shards, checkpointer, restore_step) if resuming else data_shards
  train_iterator = processes.ShardedIterator(lambda index, count: data.shard(index, count).train_iterator(seed),
                                             shards or jax.process_count())
  if resuming:
    state = checkpointer.restore(steps.abstract_state, steps.state_shardings, train_iterator, step=restore_step)
    logging.info("Resumed from %s at step %d.", checkpointer.directory, int(state.step))
    if init_params_from or init_from is not None:
      logging.warning("Ignoring the initial params (%s): the workdir already holds checkpoints.",
                      init_params_from or init_from.path)
  elif init_params_from:
    params, _ = checkpointing.restore_params(init_params_from, steps.abstract_state.params,
                                             steps.state_shardings.params)
    state = training.create_train_state(model, optimizer, mesh, seed, params=params)
    logging.info("Starting from the params in %s with a fresh optimizer.", init_params_from)
  elif init_from is not None:
    state = training.create_train_state(model, optimizer, mesh, seed, params=_warm_start(init_from, model, steps,
                                                                                        seed))
  else:
    state = training.create_train_state(model, optimizer, mesh, seed)
  # Nothing was written so far: what fails above leaves no workdir behind.
  checkpointer = checkpointer or checkpointing.Checkpointer(checkpoint_dir)
  _write_config(workdir, model, data)

  if peak_flops is None:
    per_device, source = flops.peak_flops_per_device()
    devices = 1 if jax.devices()[0].platform == "cpu" else jax.device_count()
    peak_flops = per_device * devices
    logging.info("MFU against %.3g FLOP/s (%s x %d).", peak_flops, source, devices)
  tokens_per_step = data.global_batch_size * data.seq_len
  flops_per_token = model.flops_per_token(data.seq_len)
  logging.info("MFU counts %.4g FLOPs per step: %.4g per token (6 x matmul params + attention, "
               "%s.flops_per_token) x %d tokens.", flops_per_token * tokens_per_step, flops_per_token,
               type(model).__name__, tokens_per_step)
  pipeline = pipeline_parallel.schedule(model.config, pipeline_parallel.mesh_stages(mesh))
  if pipeline is not None:
    logging.info("Pipeline: %s (the bubble: stages idle that fraction of the pipelined stacks' time).",
                 pipeline.describe())
  step = first_step = int(state.step)
  log = MetricsLog(workdir, step, num_steps, flops_per_token * tokens_per_step, peak_flops)
  schedule = training.learning_rate_schedule()
  lagged = _LaggedMetrics(int(state.consecutive_bad_steps), int(state.skipped_steps))  # read once, at the start
  last_metrics: dict[str, float] = {}

  def settle(read: tuple[int, dict[str, float]] | None) -> None:
    """Logs a finished step's metrics (every log_every steps) and stops a run that keeps diverging."""
    nonlocal last_metrics
    if read is None:
      return
    done, values = read
    if done % log_every == 0 or done == num_steps:
      last_metrics = dict(values, learning_rate=float(schedule(done - 1)), skipped_steps=lagged.skipped_steps)
      log.train(done, last_metrics, tokens_per_step)
    if lagged.consecutive_bad_steps >= max_consecutive_bad_steps:
      checkpointer.wait()  # a pending periodic save completes
      saved = _save_diverged(workdir, state, model, data, done)
      raise TrainingDiverged(f"Stopped at step {done}: {lagged.consecutive_bad_steps} consecutive steps had a "
                             f"non-finite loss or gradient (max_consecutive_bad_steps={max_consecutive_bad_steps}); "
                             f"{saved}.")

  with checkpointing.PreemptionGuard() as preemption, _closing_unless_aborted(checkpointer, lambda: step):
    # A stop requested before this training began (a program running several holds a guard around them). Read once:
    # a request arriving later is seen by should_stop after a step, which saves that step.
    stopped_before = preemption.requested
    if stopped_before:
      logging.info("Stop requested before step %d: %s not trained further.", step + 1, workdir)
      last_metrics[_stop_metric(preemption)] = step
    while step < num_steps and not stopped_before:
      waiting = time.perf_counter()
      batch = next(train_iterator)
      log.waited_for_data(time.perf_counter() - waiting)
      check_batch(batch, f"the training batch of step {step + 1}")
      state, metrics = steps.train(state, training.global_batch(batch, mesh))
      step += 1
      settle(lagged.push(step, metrics))  # the previous step's, now that this one is queued
      evaluate_now = step % eval_every == 0 or step == num_steps
      stop = preemption.should_stop(step)
      if evaluate_now or stop:
        settle(lagged.flush())  # this step's, before it is evaluated or the run stops
      if evaluate_now:
        results = evaluate(steps, state.params, data.eval_batches(), mesh, eval_max_batches, check_batch)
        logging.info("step %d  validation loss %.4f  perplexity %.2f", step, results["loss"], results["perplexity"])
        log.scalars(step, results, "validation")
        last_metrics.update({f"validation_{k}": v for k, v in results.items()})
        log.restart(step)
      checkpointer.maybe_save(step, state, train_iterator, force=stop or step == num_steps)
      if stop:
        checkpointer.wait()
        interrupted = preemption.signal_name == "SIGINT"
        logging.info("%s: saved step %d to %s; exiting.", "Interrupted" if interrupted else "Preempted", step,
                     checkpointer.directory)
        last_metrics[_stop_metric(preemption)] = step
        break
  log.close()
  final = os.path.join(workdir, "final_metrics.json")
  if step == first_step and os.path.exists(final):  # nothing trained (a finished run resumed): its metrics stand
    with open(final) as f:
      last_metrics = {**json.load(f), **last_metrics}
  _write_atomically(final, json.dumps(last_metrics, indent=1))
  return last_metrics

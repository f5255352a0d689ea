"""Train state, optimizer, and the pure, sharded train / eval steps.

A model is any object with its family's `config`, `param_specs()`, `loss(params, batch, dropout_rng) -> (loss, sums)`
and `flops_per_token(seq_len)` (see cpm_jax.models.cpm.CPMLanguageModel). Everything here is a pure
function of (state, batch); `make_sharded_steps` jits them with explicit in/out shardings over a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Protocol

import flax.struct
import gin
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpm_jax import layers, partitioning


class Model(Protocol):
  config: Any  # the family's config (what checkpoints record)

  def param_specs(self) -> Any: ...
  def loss(self, params: Any, batch: dict, dropout_rng: jax.Array | None = None) -> tuple[jax.Array, dict]: ...
  def flops_per_token(self, seq_len: int) -> float: ...
  # The batch `loss` reads, as ShapeDtypeStructs (`abstract_batch`): what the planner and ahead-of-time compiles
  # feed it. target_len: the decoder length of encoder-decoder models (0: their default).
  def example_batch(self, batch_size: int, seq_len: int, target_len: int = 0) -> dict: ...
  def with_config(self, config: Any) -> Model: ...  # the same model with another config


def abstract_batch(batch_size: int, fields: dict[str, tuple[tuple[int, ...], Any]]) -> dict:
  """ShapeDtypeStructs of a batch: each field's (per-example shape, dtype) behind a leading batch axis."""
  return {name: jax.ShapeDtypeStruct((batch_size, *shape), jnp.dtype(dtype)) for name, (shape, dtype) in fields.items()}


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed whole."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
  consecutive_bad_steps: jax.Array
  skipped_steps: jax.Array


# ---- optimizer -----------------------------------------------------------------------------------

@gin.configurable
def learning_rate_schedule(peak: float = 1.5e-4, warmup_steps: int = 5000, total_steps: int = 20000,
                           decay: str = "cosine", end_ratio: float = 0.1) -> optax.Schedule:
  """Linear warm-up to `peak`, then cosine / linear decay to end_ratio * peak, or constant."""
  if decay not in ("cosine", "linear", "constant"):
    raise ValueError(f"learning_rate_schedule.decay={decay!r}; expected 'cosine', 'linear' or 'constant'.")
  warmup_steps = min(warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup_steps, 1)
  if decay == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end_ratio)
  elif decay == "linear":
    after = optax.linear_schedule(peak, peak * end_ratio, decay_steps)
  else:
    after = optax.constant_schedule(peak)
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after], [warmup_steps])


def _decay_mask(params: Any) -> Any:
  """Weight decay on matmul kernels and embeddings only, never on biases or LayerNorm."""
  def decays(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return name.endswith("kernel") or name in ("wte", "wpe", "token_type", "word_embeddings")
  return jax.tree_util.tree_map_with_path(decays, params)


class RowAdagradState(NamedTuple):
  sum_of_squares: Any  # per param, [rows, 1, ...]: one accumulator per leading-axis row


def scale_by_row_rss(eps: float = 1e-10) -> optax.GradientTransformation:
  """Row-wise Adagrad (PyTorch-BigGraph's optimizer for embedding tables): each leading-axis row keeps one
  accumulator, the running sum of its gradients' mean square, and its gradient is divided by the root of it.

  The state is 1/dim of full Adagrad's. A row whose gradient is zero (not in the batch) keeps its value and its
  accumulator. Accumulators have the params' rank ([rows, 1, ...]), so they shard like the params by rows.
  """
  def row_mean_square(g):
    return jnp.mean(jnp.square(g), axis=tuple(range(1, g.ndim)), keepdims=True)

  def init(params):
    return RowAdagradState(jax.tree.map(lambda p: jnp.zeros((p.shape[0],) + (1,) * (p.ndim - 1), p.dtype), params))

  def update(updates, state, params=None):
    del params
    sums = jax.tree.map(lambda s, g: s + row_mean_square(g), state.sum_of_squares, updates)
    updates = jax.tree.map(lambda g, s: jnp.where(s > 0, g * jax.lax.rsqrt(s + eps), 0.0), updates, sums)
    return updates, RowAdagradState(sums)

  return optax.GradientTransformation(init, update)


OPTIMIZERS = ("adamw", "adagrad", "row_adagrad")


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm as one scalar factor, min(1, max_norm / norm), taking the norm from the caller when
  given (`update(..., global_norm=)`; train_step has computed it already).

  optax's own selects between the updates and a per-element division; its result is then written out in full
  before AdamW reads it (two [params]-sized temporaries and two extra passes per step with the gradient's
  1 / weight-sum scaling). A scalar factor is folded into AdamW's element-wise update instead.
  """
  def update(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if global_norm is None else global_norm
    scale = jnp.minimum(1.0, max_norm / norm)
    return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


@gin.configurable
def make_optimizer(schedule: optax.Schedule | None = None, weight_decay: float = 0.01, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, clip_norm: float | None = 1.0,
                   optimizer: str = "adamw") -> optax.GradientTransformation:
  """AdamW with global-norm clipping (CPM's release used Adam, lr 1.5e-4, 5k warm-up of 20k).

  optimizer "adagrad" (per-element) or "row_adagrad" (`scale_by_row_rss`) change only the rows a batch touches,
  as embedding tables need (Adam's moments move every row they ever touched on every later step); b1 and b2 are
  Adam's only. Weight decay, decoupled as in AdamW, applies to the same parameters in all three (`_decay_mask`).
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"make_optimizer.optimizer={optimizer!r}; expected one of {list(OPTIMIZERS)}.")
  schedule = schedule or learning_rate_schedule()
  chain = [clip_by_global_norm(clip_norm)] if clip_norm else []
  if optimizer == "adamw":
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask))
  else:
    scaling = {"adagrad": lambda: optax.scale_by_rss(initial_accumulator_value=0.0, eps=eps),
               "row_adagrad": lambda: scale_by_row_rss(eps)}[optimizer]
    chain += [scaling(), optax.add_decayed_weights(weight_decay, mask=_decay_mask),
              optax.scale_by_learning_rate(schedule)]
  return optax.chain(*chain)


# ---- trainable and frozen params -----------------------------------------------------------------

def split_trainable(model: Model, tree: Any) -> tuple[Any, Any]:
  """(trainable, frozen): a params-shaped tree (params, gradients, shardings) cut by the model's specs'
  `trainable`, each part holding None where the other has leaves. Frozen params get no gradient and no optimizer
  state; a model whose params all train has frozen = all None."""
  mask = layers.trainable(model.param_specs())
  return (jax.tree.map(lambda leaf, trains: leaf if trains else None, tree, mask),
          jax.tree.map(lambda leaf, trains: None if trains else leaf, tree, mask))


def join_trainable(trainable: Any, frozen: Any) -> Any:
  """The params tree `split_trainable` cut."""
  return jax.tree.map(lambda leaf, other: other if leaf is None else leaf, trainable, frozen,
                      is_leaf=lambda x: x is None)


# ---- state creation ------------------------------------------------------------------------------

def _init_state(model: Model, optimizer: optax.GradientTransformation, seed: int, params: Any = None) -> TrainState:
  init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
  if params is None:
    params = layers.init_from_specs(model.param_specs(), init_key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(split_trainable(model, params)[0]), rng=state_key,
                    consecutive_bad_steps=jnp.zeros((), jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))


@functools.lru_cache(maxsize=16)
def abstract_state(model: Model, optimizer: optax.GradientTransformation) -> TrainState:
  """The train state's ShapeDtypeStructs (no allocation); cached, as the planner asks once per candidate mesh."""
  return jax.eval_shape(functools.partial(_init_state, model, optimizer), 0)


def state_shardings(model: Model, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules=None) -> tuple[TrainState, TrainState]:
  """(abstract state, shardings): params by the logical-axis rules, optimizer moments like params."""
  abstract = abstract_state(model, optimizer)
  specs = model.param_specs()
  param_shardings = partitioning.tree_shardings(layers.logical_axes(specs), mesh, abstract.params, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract.opt_state, split_trainable(model, param_shardings)[0],
      transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, NamedSharding))
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated,
                         consecutive_bad_steps=replicated, skipped_steps=replicated)
  return abstract, shardings


def create_train_state(model: Model, optimizer: optax.GradientTransformation, mesh: Mesh, seed: int,
                       rules=None, params: Any = None) -> TrainState:
  """A fresh state created already sharded (jit with out_shardings): never whole on one host.

  With `params` (already sharded, e.g. from checkpointing.restore_params; donated) the state starts from
  them with a fresh optimizer instead of initialising new ones.
  """
  _, shardings = state_shardings(model, optimizer, mesh, rules)
  init = jax.jit(functools.partial(_init_state, model, optimizer), static_argnums=0, out_shardings=shardings,
                 donate_argnums=1)
  with partitioning.activate(mesh, rules):
    return init(seed, params)


# ---- steps ---------------------------------------------------------------------------------------

def _split_microbatches(batch: dict, num_microbatches: int) -> dict:
  def split(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(f"Batch size {x.shape[0]} is not divisible by num_microbatches={num_microbatches}.")
    return x.reshape(num_microbatches, x.shape[0] // num_microbatches, *x.shape[1:])
  return jax.tree.map(split, batch)


def _loss_and_grad_sums(model: Model, params, batch: dict, rng, num_microbatches: int):
  """Sums of (loss, gradient of the trainable params, metrics) over microbatches; dividing by the weight sum gives
  the mean."""
  params, frozen = split_trainable(model, params)

  def sum_loss(p, b, r):
    _, sums = model.loss(join_trainable(p, frozen), b, r)
    return sums["loss_sum"] + sums["z_loss_sum"], sums

  grad_fn = jax.value_and_grad(sum_loss, has_aux=True)
  if num_microbatches == 1:
    (_, sums), grads = grad_fn(params, batch, rng)
    return grads, sums

  micro = _split_microbatches(batch, num_microbatches)
  rngs = None if rng is None else jax.random.split(rng, num_microbatches)

  def body(carry, xs):
    grad_acc, sums_acc = carry
    mb, r = xs
    (_, sums), grads = grad_fn(params, mb, r)
    return (jax.tree.map(jnp.add, grad_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

  zero_grads = jax.tree.map(jnp.zeros_like, params)
  zero_sums = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                           jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro),
                                                          None if rngs is None else rngs[0])[0][1]))
  (grads, sums), _ = jax.lax.scan(body, (zero_grads, zero_sums), (micro, rngs))
  return grads, sums


class StepScalars(NamedTuple):
  denominator: jax.Array  # the weight sum (at least 1): sums / denominator are means
  loss: jax.Array  # the mean loss
  grad_norm: jax.Array  # the norm of the mean gradient
  finite: jax.Array  # both finite: a step that is not leaves params and optimizer as they are


def step_scalars(sums: dict, grads: Any) -> StepScalars:
  """The scalars of a step with these loss sums and gradient sums."""
  denominator = jnp.maximum(sums["weight_sum"], 1.0)
  loss = (sums["loss_sum"] + sums["z_loss_sum"]) / denominator
  grad_norm = optax.tree.norm(grads) / denominator
  return StepScalars(denominator, loss, grad_norm, jnp.isfinite(loss) & jnp.isfinite(grad_norm))


def apply_gradients(model: Model, optimizer: optax.GradientTransformation, grads: Any, scalars: StepScalars,
                    params: Any, opt_state: Any) -> tuple[Any, Any]:
  """(params, optimizer state) after one optimizer update by the mean gradient grads / scalars.denominator."""
  # The mean gradient and its norm (clip_by_global_norm takes it as `global_norm`) are scalar factors that XLA
  # folds into the optimizer's element-wise update: no scaled copy of the gradients is written first.
  trained, frozen = split_trainable(model, params)
  mean_grads = jax.tree.map(lambda g: g * (1.0 / scalars.denominator).astype(g.dtype), grads)
  updates, opt_state = optax.with_extra_args_support(optimizer).update(mean_grads, opt_state, trained,
                                                                       global_norm=scalars.grad_norm)
  return join_trainable(optax.apply_updates(trained, updates), frozen), opt_state


def finish_step(state: TrainState, rng: jax.Array, sums: dict, scalars: StepScalars, params: Any,
                opt_state: Any) -> tuple[TrainState, dict]:
  """The state after a step that computed `params` and `opt_state` (the state's own when not finite), and the
  step's metrics."""
  denominator, loss, grad_norm, finite = scalars
  new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      rng=rng,
      consecutive_bad_steps=jnp.where(finite, 0, state.consecutive_bad_steps + 1),
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
  )
  metrics = {
      "loss": loss,
      "cross_entropy": sums["loss_sum"] / denominator,
      "accuracy": sums["correct_sum"] / denominator,
      "grad_norm": grad_norm,
      "tokens": sums["weight_sum"],
      "finite": finite,
  }
  return new_state, metrics


def train_step(state: TrainState, batch: dict, *, model: Model, optimizer: optax.GradientTransformation,
               num_microbatches: int = 1, dropout: bool = True) -> tuple[TrainState, dict]:
  """One optimizer step. A non-finite loss or gradient leaves params and optimizer untouched.

  The skipped step is counted (skipped_steps, consecutive_bad_steps); the loop decides when to stop.
  """
  rng, step_rng = jax.random.split(state.rng)
  grads, sums = _loss_and_grad_sums(model, state.params, batch, step_rng if dropout else None,
                                    num_microbatches)
  scalars = step_scalars(sums, grads)
  # A branch, not a select between old and new state: skipping costs nothing and applying reads the state once.
  new_params, new_opt_state = jax.lax.cond(
      scalars.finite, functools.partial(apply_gradients, model, optimizer, grads, scalars),
      lambda params, opt_state: (params, opt_state), state.params, state.opt_state)
  return finish_step(state, rng, sums, scalars, new_params, new_opt_state)


def dense_step(model: Model, optimizer: optax.GradientTransformation, *, num_microbatches: int = 1,
               dropout: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """`train_step` for `model` and `optimizer`: the step of every family that brings no step of its own
  (Family.train_step)."""
  return functools.partial(train_step, model=model, optimizer=optimizer, num_microbatches=num_microbatches,
                           dropout=dropout)


def eval_step(params: Any, batch: dict, *, model: Model) -> dict:
  """Loss sums over a batch (no dropout); aggregate across batches, then divide."""
  _, sums = model.loss(params, batch, None)
  return sums


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
  """The leading (batch) axis split over the batch mesh axes, any further axes whole: one sharding that fits
  batch leaves of every rank ([batch] labels, [batch, length] tokens, ...)."""
  return NamedSharding(mesh, partitioning.logical_to_spec(("batch",), rules, mesh.axis_names))


def global_batch(local_batch: dict, mesh: Mesh, rules=None) -> dict:
  """Assembles each process's share of the batch into global jax.Arrays sharded over (data, fsdp) on their
  leading axis."""
  sharding = batch_sharding(mesh, rules)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


@dataclasses.dataclass(frozen=True)
class ShardedSteps:
  """The jitted steps for one (model, optimizer, mesh): state donated, shardings explicit."""

  train: Callable[[TrainState, dict], tuple[TrainState, dict]]
  evaluate: Callable[[Any, dict], dict]
  state_shardings: TrainState
  abstract_state: TrainState


def make_sharded_steps(model: Model, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                       num_microbatches: int = 1, dropout: bool = True, rules=None,
                       make_step: Callable[..., Callable] = dense_step) -> ShardedSteps:
  """The jitted steps; make_step(model, optimizer, num_microbatches=, dropout=) gives the train step (the family's,
  Family.train_step; default `dense_step`)."""
  abstract, shardings = state_shardings(model, optimizer, mesh, rules)
  data_sharding = batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())

  def with_mesh(fn):
    @functools.wraps(fn)
    def wrapped(*args):
      with partitioning.activate(mesh, rules):
        return fn(*args)
    return wrapped

  train = jax.jit(
      with_mesh(make_step(model, optimizer, num_microbatches=num_microbatches, dropout=dropout)),
      in_shardings=(shardings, data_sharding), out_shardings=(shardings, replicated), donate_argnums=0)
  evaluate = jax.jit(with_mesh(functools.partial(eval_step, model=model)),
                     in_shardings=(shardings.params, data_sharding), out_shardings=replicated)
  return ShardedSteps(train=train, evaluate=evaluate, state_shardings=shardings, abstract_state=abstract)

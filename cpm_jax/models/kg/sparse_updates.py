"""The KG family's train step: the entity rows a batch reads are gathered, differentiated, updated by the optimizer
and scattered back into the donated table and optimizer state; no table-sized gradient exists.

The generic step (training.train_step) differentiates the loss with respect to the whole entity table: the table's
gradient (the batch's row gradients scattered into zeros) and its scaled copy inside the update are two
table-sized temporaries beside the table (30.4 GiB of a V100's 31.7 at CPM-KM's size, BUILD.md). Here the batch's
distinct entity ids (heads, tails and uniform negatives, `jnp.unique` at the id list's fixed length, padded with the
id one past the table, which reads zeros and writes nowhere) select the rows of the table and of every
table-shaped optimizer state; the loss is differentiated with respect to those rows (a row read twice gets the sum of
both gradients, as in the dense gradient), `training.apply_gradients` updates them with the configured optimizer,
and the results are written back to their rows. The relation table (small) is updated whole. A non-finite step
writes the rows back unchanged.

Equal to the generic step when a row with zero gradient keeps its value and its optimizer state (Adagrad and row
Adagrad, with weight decay off for the tables as make_optimizer's mask has it): `sparse_step` checks that of the
optimizer it gets and takes the generic step otherwise: under AdamW (whose moments keep moving every row they ever
saw) and with several microbatches (not implemented here). It also takes the generic step where that is the leaner
one, a small table whose device shard has fewer than twice the rows a batch reads (UMLS, Kinships): the sparse
step's rows are the same on every device (each holds the batch's whole id list), so they cost more than a small shard.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from absl import logging

from cpm_jax import layers, partitioning, training
from cpm_jax.models.kg.model import KGEmbeddingModel


def _table_shaped(optimizer: optax.GradientTransformation, opt_state: Any) -> list[bool]:
  """Per leaf of `opt_state` (jax.tree.leaves order): whether it is a state of the entity table, one row per entity
  row (row Adagrad's accumulators, Adagrad's sums of squares)."""
  return jax.tree.leaves(optax.tree_map_params(optimizer, lambda _, rows: rows, opt_state,
                                               {"entities": True, "relations": False},
                                               transform_non_params=lambda _: False))


def untouched_rows_stay(model: KGEmbeddingModel, optimizer: optax.GradientTransformation) -> bool:
  """Whether, under `optimizer`, an entity row whose gradient is zero keeps its value and its state: two updates of
  two-row tables, the second with no gradient for row 1."""
  params = jax.tree.map(lambda leaf: jnp.ones((2, *leaf.shape[1:]), leaf.dtype),
                        layers.abstract_params(model.param_specs(), model.config.param_dtype))
  update = optax.with_extra_args_support(optimizer).update
  _, before = update(jax.tree.map(jnp.ones_like, params), optimizer.init(params), params, global_norm=1.0)
  second = jax.tree.map(lambda g: g.at[1].set(0.0), jax.tree.map(jnp.ones_like, params))
  updates, after = update(second, before, params, global_norm=1.0)
  moved = bool(jnp.any(updates["entities"][1] != 0))
  for old, new, rows in zip(jax.tree.leaves(before), jax.tree.leaves(after), _table_shaped(optimizer, before)):
    moved |= rows and bool(jnp.any(old[1] != new[1]))
  return not moved


def sparse_train_step(state: training.TrainState, batch: dict, *, model: KGEmbeddingModel,
                      optimizer: optax.GradientTransformation,
                      dropout: bool = True) -> tuple[training.TrainState, dict]:
  """training.train_step's step (same rng use, metrics, skipping of non-finite steps) by sparse row updates."""
  rng, step_rng = jax.random.split(state.rng)
  ids = model.entity_ids(batch, step_rng if dropout else None)
  rows, inverse = jnp.unique(ids, return_inverse=True, size=ids.shape[0], fill_value=model.config.entity_rows)
  take = lambda table: table.at[rows].get(mode="fill", fill_value=0)
  put = lambda table, values: table.at[rows].set(values, mode="drop")
  state_leaves, state_tree = jax.tree.flatten(state.opt_state)
  table_shaped = _table_shaped(optimizer, state.opt_state)
  params = {"entities": take(state.params["entities"]), "relations": state.params["relations"]}
  opt_state = state_tree.unflatten([take(leaf) if shaped else leaf
                                    for leaf, shaped in zip(state_leaves, table_shaped)])

  def sum_loss(p):
    _, sums = model.loss_of_rows(p["entities"][inverse], p["relations"], batch)
    return sums["loss_sum"] + sums["z_loss_sum"], sums

  (_, sums), grads = jax.value_and_grad(sum_loss, has_aux=True)(params)
  scalars = training.step_scalars(sums, grads)
  new_params, new_opt_state = training.apply_gradients(model, optimizer, grads, scalars, params, opt_state)
  keep_unless_finite = functools.partial(jax.tree.map, lambda new, old: jnp.where(scalars.finite, new, old))
  new_params, new_opt_state = keep_unless_finite(new_params, params), keep_unless_finite(new_opt_state, opt_state)
  written = [put(old, new) if shaped else new
             for old, new, shaped in zip(state_leaves, jax.tree.leaves(new_opt_state), table_shaped)]
  return training.finish_step(state, rng, sums, scalars,
                              {"entities": put(state.params["entities"], new_params["entities"]),
                               "relations": new_params["relations"]},
                              state_tree.unflatten(written))


def _not_exact_because(model: KGEmbeddingModel, optimizer: optax.GradientTransformation,
                       num_microbatches: int) -> str | None:
  """Why `sparse_train_step` would not equal the dense step here (None: it would)."""
  if num_microbatches != 1:
    return f"it takes one microbatch, not train.num_microbatches={num_microbatches}"
  if not untouched_rows_stay(model, optimizer):
    return ("it needs an optimizer that leaves rows with no gradient as they are (make_optimizer.optimizer "
            "'row_adagrad' or 'adagrad'; AdamW's moments move them)")
  return None


def sparse_only_step(model: KGEmbeddingModel, optimizer: optax.GradientTransformation, *, num_microbatches: int = 1,
                     dropout: bool = True) -> Callable[[training.TrainState, dict], tuple[training.TrainState, dict]]:
  """`sparse_train_step` whatever the sizes (what benchmarks and tests compare with the dense step); a ValueError
  where it would not equal the dense step."""
  reason = _not_exact_because(model, optimizer, num_microbatches)
  if reason:
    raise ValueError(f"The KG sparse row update: {reason}.")
  return functools.partial(sparse_train_step, model=model, optimizer=optimizer, dropout=dropout)


def sparse_step(model: KGEmbeddingModel, optimizer: optax.GradientTransformation, *, num_microbatches: int = 1,
                dropout: bool = True) -> Callable[[training.TrainState, dict], tuple[training.TrainState, dict]]:
  """The family's train step (Family.train_step): `sparse_train_step` where it equals the dense step (one microbatch,
  an optimizer under which untouched rows stay) and is the leaner one (`_sparse_is_leaner`), else
  training.dense_step (logged)."""
  dense = training.dense_step(model, optimizer, num_microbatches=num_microbatches, dropout=dropout)
  reason = _not_exact_because(model, optimizer, num_microbatches)
  if reason:
    logging.warning("KG training with the dense step (a table-sized gradient), not the sparse row update: %s.", reason)
    return dense
  sparse = sparse_only_step(model, optimizer, dropout=dropout)

  def step(state, batch):
    rows_read = jax.eval_shape(model.entity_ids, batch).shape[0]
    mesh = partitioning.active_mesh()
    shards = 1 if mesh is None else partitioning.logical_shards(mesh, "entities", partitioning.active_rules())
    shard_rows = model.config.entity_rows // shards
    leaner = _sparse_is_leaner(rows_read, shard_rows)
    logging.info("KG train step: %s (a batch reads %d entity rows; a device holds %d).",
                 "sparse row update" if leaner else "dense", rows_read, shard_rows)
    return (sparse if leaner else dense)(state, batch)

  return step


def _sparse_is_leaner(rows_read: int, shard_rows: int) -> bool:
  """Whether the sparse step needs less memory than the dense one: its temporaries are ~3.4 copies of the rows a batch
  reads (XLA's figures, BUILD.md), the dense step's two copies of the device's table shard."""
  return 2 * rows_read <= shard_rows

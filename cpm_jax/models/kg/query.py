"""The best-scoring tails (or heads) of queries over all entities, found in sharded entity blocks.

Each device keeps the top k of its own rows while scanning them `block_size` at a time; only the [devices, queries,
k] candidates are gathered and merged, so no device holds a [queries, entities] score matrix.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from cpm_jax.models.kg import model as kg_model
from cpm_jax.models.kg.config import KGConfig
from cpm_jax.models.kg.scoring import SCORERS


@functools.lru_cache(maxsize=None)
def _top_k_function(config: KGConfig, mesh: Mesh, axes: tuple[str, ...], side: str, k: int, block_size: int):
  scorer = SCORERS[config.scoring]

  def top_k_on_device(table, queries):
    rows = table.shape[0]
    start = (jax.lax.axis_index(axes) if axes else 0) * rows
    size = min(block_size, rows)

    def block(index, best):
      best_scores, best_ids = best
      lo = jnp.minimum(index * size, rows - size)
      ids = start + lo + jnp.arange(size)
      scores = scorer.compare(queries, jax.lax.dynamic_slice_in_dim(table, lo, size)).astype(jnp.float32)
      fresh = (lo + jnp.arange(size) >= index * size) & (ids < config.num_entities)
      scores = jnp.where(fresh[None, :], scores, -jnp.inf)
      merged_scores = jnp.concatenate([best_scores, scores], axis=1)
      merged_ids = jnp.concatenate([best_ids, jnp.broadcast_to(ids, scores.shape)], axis=1)
      top_scores, where = jax.lax.top_k(merged_scores, k)
      return top_scores, jnp.take_along_axis(merged_ids, where, axis=1)

    empty = (jnp.full((queries.shape[0], k), -jnp.inf), jnp.full((queries.shape[0], k), -1, jnp.int32))
    best_scores, best_ids = jax.lax.fori_loop(0, math.ceil(rows / size), block, empty)
    return best_scores[None], best_ids[None]

  device_top_k = jax.shard_map(
      top_k_on_device, mesh=mesh, in_specs=(PartitionSpec(axes or None, None), PartitionSpec()),
      out_specs=(PartitionSpec(axes or None), PartitionSpec(axes or None)), check_vma=False)

  def top_k(params, entity_ids, relation_ids):
    entity, relation = params["entities"][entity_ids], params["relations"][relation_ids]
    queries = scorer.tail_queries(entity, relation) if side == "tail" else scorer.head_queries(relation, entity)
    scores, ids = device_top_k(params["entities"], queries)  # [devices, queries, k]
    scores, ids = jnp.moveaxis(scores, 0, 1).reshape(len(entity_ids), -1), jnp.moveaxis(ids, 0, 1).reshape(
        len(entity_ids), -1)
    best, where = jax.lax.top_k(scores, k)
    return best, jnp.take_along_axis(ids, where, axis=1)

  return jax.jit(top_k)


def top_k(params: dict, config: KGConfig, entity_ids, relation_ids, k: int, mesh: Mesh, *, side: str = "tail",
          rules=None, block_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """(scores, entity ids), each [queries, k], best first: side "tail" ranks tails of (entity, relation, ?), "head"
  ranks heads of (?, relation, entity)."""
  if not 1 <= k <= config.num_entities:
    raise ValueError(f"k={k}: expected 1 <= k <= num_entities ({config.num_entities}).")
  function = _top_k_function(config, mesh, kg_model.entity_row_axes(rules), side, k, block_size)
  scores, ids = function(params, np.asarray(entity_ids, np.int32), np.asarray(relation_ids, np.int32))
  return np.asarray(scores), np.asarray(ids)
